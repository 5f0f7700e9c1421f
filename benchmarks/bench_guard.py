"""What the output guards cost: this tree's DB-MTL steps against an earlier git revision, side by side.

The library's steps of ``jax_steps.py`` (the ``dbmtl`` transform on fixed gradients, the fused
step exact and in place, the chain with ``value_and_task_grads`` of a ``TrunkHeads`` spec) and ``skip_invalid_steps``
around the chain are built twice, once from this tree and once from ``--base`` (extracted with
``git archive`` and imported as ``dbmtl_jax_base``), and timed interleaved in one process.

    taskset -c 0 python benchmarks/bench_guard.py --base b50bbd9 --tasks 3,10 --out benchmarks/RESULTS_guard.md
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Runner, interleaved_times, jax_runner, median_ms, memory_of, step_runner, transform_runner  # noqa: E402
from models import is_shared, make_problem  # noqa: E402


def extract_base(rev: str, dest: Path) -> str:
    """``git archive`` of ``rev``'s package into ``dest/dbmtl_jax_base`` with its imports renamed."""
    data = subprocess.run(["git", "archive", rev, "dbmtl_jax"], cwd=HERE.parent, check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest)
    (dest / "dbmtl_jax").rename(dest / "dbmtl_jax_base")
    for f in (dest / "dbmtl_jax_base").rglob("*.py"):
        f.write_text(re.sub(r"\bdbmtl_jax\b", "dbmtl_jax_base", f.read_text()))
    sys.path.insert(0, str(dest))
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=HERE.parent, check=True,
                          capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def package_as(name: str):
    """Imports of ``dbmtl_jax`` (and its submodules) resolve to package ``name`` inside the block."""
    if name == "dbmtl_jax":
        yield
        return
    pkg = importlib.import_module(name)
    saved = {k: v for k, v in sys.modules.items() if k == "dbmtl_jax" or k.startswith("dbmtl_jax.")}
    for k in list(saved):
        del sys.modules[k]
    sys.modules["dbmtl_jax"] = pkg
    for sub in ("task_axis", "guard", "dbmtl", "fused", "task_gradients"):
        sys.modules[f"dbmtl_jax.{sub}"] = importlib.import_module(f"{name}.{sub}")
    try:
        yield
    finally:
        for k in [k for k in sys.modules if k == "dbmtl_jax" or k.startswith("dbmtl_jax.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def steps_module(name: str):
    """A fresh copy of ``jax_steps.py`` bound to package ``name``."""
    with package_as(name):
        spec = importlib.util.spec_from_file_location(f"jax_steps_{name}", HERE / "jax_steps.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def guarded_chain_runner(problem, steps, pkg, tag: str) -> Runner:
    """``skip_invalid_steps(chain(dbmtl, adam))`` on ``value_and_task_grads(TrunkHeads)`` (the trunk-loop chain, guarded)."""
    grads_fn = steps.grads_fn(problem, "trunk-loop")
    tx = pkg.skip_invalid_steps(optax.chain(pkg.dbmtl(problem.num_tasks, shared=is_shared), optax.adam(1e-4)))
    params = steps.to_jax(problem.params)
    batch = steps.to_jax(problem.batch)

    def step(p, s, b):
        losses, g = grads_fn(p, b)
        u, s = tx.update(g, s, p, losses=losses)
        return optax.apply_updates(p, u), s, losses

    state = jax.tree_util.tree_map(jnp.copy, tx.init(params))  # base revisions aliased the skip counters
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch).compile()
    return step_runner(f"{tag}:skip(chain)", compiled, params, state, batch, {"memory": memory_of(compiled)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="b50bbd9", help="git revision to compare against")
    ap.add_argument("--tasks", default="3,10")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(HERE / "RESULTS_guard.md"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    base_rev = extract_base(args.base, tmp)
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, check=True,
                              capture_output=True, text=True).stdout.strip()
    import dbmtl_jax
    import dbmtl_jax_base

    mods = {"base": (steps_module("dbmtl_jax_base"), dbmtl_jax_base), "this": (steps_module("dbmtl_jax"), dbmtl_jax)}
    load0 = os.getloadavg()
    t0 = time.time()
    sections = []
    for t in (int(x) for x in args.tasks.split(",")):
        problem = make_problem("mlp", t)
        runners = []
        for tag, (steps, pkg) in mods.items():
            with package_as(pkg.__name__):
                for variant in ("trunk-loop", "fused@1", "fused-inplace@1"):
                    base_v, _, chunk = variant.partition("@")
                    r = jax_runner_for(steps, problem, base_v, int(chunk) if chunk else None)
                    r.name = f"{tag}:{variant}"
                    runners.append(r)
                r = transform_runner_for(steps, problem)
                r.name = f"{tag}:transform-only"
                runners.append(r)
                runners.append(guarded_chain_runner(problem, steps, pkg, tag))
        interleaved_times(runners, reps=args.reps)
        by = {r.name: r for r in runners}
        lines = [f"### MLP problem, T = {t} (P shared = {problem.n_shared:,})", "",
                 f"| step | {base_rev} (ms) | {head_rev} (ms) | ratio | temp memory {base_rev} → {head_rev} (P floats) |",
                 "|---|---|---|---|---|"]
        for v in ("trunk-loop", "fused@1", "fused-inplace@1", "transform-only", "skip(chain)"):
            a, b = by[f"base:{v}"], by[f"this:{v}"]
            ma, mb = median_ms(a), median_ms(b)
            mem = []
            for r in (a, b):
                m = (r.info.get("memory") or {}).get("temp")
                mem.append("—" if m is None else f"{m / 4 / problem.n_shared:.1f}")
            lines.append(f"| `{v}` | {ma:.2f} | {mb:.2f} | {mb / ma:.3f} | {mem[0]} → {mem[1]} |")
        sections.append("\n".join(lines))
    load1 = os.getloadavg()
    header = [
        "# What the output guards cost (issue 13)",
        "",
        f"- **Command:** `python benchmarks/bench_guard.py --base {args.base} --tasks {args.tasks} --reps {args.reps}`"
        f" (wall time {time.time() - t0:.0f} s)",
        f"- **Date:** {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; this tree: {head_rev} (with uncommitted"
        f" changes if any); base: {base_rev}",
        f"- **Machine:** {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__};"
        f" load average {load0[0]:.2f} → {load1[0]:.2f} (a shared machine: the ratio, measured interleaved in one"
        " process, is the figure to read)",
        "- Subjects as in `benchmarks/RESULTS.md`; `skip(chain)` = `skip_invalid_steps(chain(dbmtl, adam))` on"
        " `value_and_task_grads(TrunkHeads(...))`. Median of interleaved repetitions.",
        "",
    ]
    Path(args.out).write_text("\n".join(header) + "\n\n".join(sections) + "\n")
    print(Path(args.out).read_text())


def jax_runner_for(steps, problem, variant: str, chunk):
    """``harness.jax_runner`` with the step builder of ``steps`` (one package version)."""
    import harness

    saved = harness.build_step
    harness.build_step = steps.build_step
    try:
        return jax_runner(problem, variant, chunk_size=chunk)
    finally:
        harness.build_step = saved


def transform_runner_for(steps, problem):
    import harness

    saved = harness.transform_only
    harness.transform_only = steps.transform_only
    try:
        return transform_runner(problem)
    finally:
        harness.transform_only = saved


if __name__ == "__main__":
    main()

"""Speed / memory benchmark of per-task-gradient DB-MTL steps (issue 6).

Usage (from the repository root)::

    python benchmarks/run.py                 # full suite, writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick         # T ∈ {3, 10}, fewer repetitions
    python benchmarks/run.py --problems mlp --tasks 3,10 --variants ew,loop,trunk-loop
    python benchmarks/run.py --no-torch --threads 1 --out /tmp/RESULTS.md

Measures, for each problem (``mlp``, ``conv``) and number of tasks T:

1. step time (median of interleaved repetitions) of EW + Adam, DB-MTL + Adam
   with every per-task-gradient strategy, and the LibMTL-style PyTorch steps;
2. the FLOP floor cost(per-task-gradient step) / cost(EW step) from XLA's
   compiled cost analysis and the efficiency (EW time × FLOP ratio) / time;
3. peak memory from XLA's compiled memory analysis (RSS high-water mark for
   PyTorch, in a subprocess) against params + Adam state + T×P EMA;
4. compile time against T;
5. head-backward FLOPs per strategy against one backward per head;
6. the DB-MTL transform's own cost (standalone, and step − step with a plain sum).

All subjects run with the same thread count: the process is pinned to
``--threads`` CPUs before JAX starts (XLA sizes its pool from the affinity
mask) and ``torch.set_num_threads(--threads)``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_TASKS = (2, 3, 10, 40)
QUICK_TASKS = (3, 10)
# "name@c": chunk size c for the chunk / trunk-chunk / fused variants.
MLP_VARIANTS = (
    "ew", "vmap", "loop", "chunk@4", "trunk-vmap", "trunk-loop", "trunk-chunk@4",
    "fused@1", "fused-inplace@1", "fused-inplace@2", "fused-inplace@4", "sum:trunk-loop", "sum:fused@1",
)
CONV_VARIANTS = (
    "ew", "vmap", "loop", "trunk-vmap", "trunk-loop", "trunk-chunk@4", "fused@1", "fused-inplace@1",
)
MALLOC = {"tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}
# Naive strategies back-propagate all T heads for every task (T² head passes); on the conv problem at
# large T that is minutes of compile/run time for a known answer, so they are skipped above this T.
NAIVE = ("vmap", "loop", "chunk")
CONV_NAIVE_MAX_T = 10


def _parse_ints(s: str) -> tuple:
    return tuple(int(x) for x in s.split(",") if x)


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T ∈ {3,10}, 5 repetitions (a couple of minutes)")
    p.add_argument("--problems", default="mlp,conv", help="comma list of: mlp, conv")
    p.add_argument("--tasks", default=None, help="comma list of T (default 2,3,10,40; --quick: 3,10)")
    p.add_argument("--variants", default=None,
                   help="comma list of JAX variants, 'name@chunk' for chunked ones (default: all for the problem)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 7; --quick 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every subject (default: all CPUs)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--no-rss", action="store_true", help="skip the PyTorch RSS subprocesses")
    p.add_argument("--tiny", action="store_true", help="tiny problem sizes (a smoke test of the suite, not a benchmark)")
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"), help="markdown report path")
    p.add_argument("--json", default=None, help="also dump raw results as JSON here")
    p.add_argument("--malloc", choices=("default",) + tuple(MALLOC), default="default",
                   help="memory allocator for every subject: tcmalloc re-executes this command with LD_PRELOAD of "
                        "Debian's libtcmalloc-minimal4 (large fresh buffers then skip the page faults glibc pays)")
    p.add_argument("--torch-rss", nargs=3, metavar=("PROBLEM", "T", "KIND"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def pin_threads(threads: Optional[int]) -> int:
    """Pins this process to ``threads`` CPUs (before JAX/torch start); returns the count."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    n = len(cpus) if threads is None else max(1, min(threads, len(cpus)))
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus[:n]))
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MKL_NUM_THREADS", str(n))
    return n


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


# --------------------------------------------------------------------------- PyTorch RSS (subprocess)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


TINY = {"mlp": dict(batch_size=16, d_in=8, hidden=16, d_feat=8, d_out=3), "conv": dict(batch_size=2, image=8)}


def torch_rss_child(problem: str, num_tasks: int, kind: str, threads: int, tiny: bool = False) -> None:
    """Child process: prints JSON with the persistent tensor bytes and the step's transient RSS.

    One warm-up step first (so that lazily loaded kernels and libraries are
    resident), then the peak-RSS counter is reset (``/proc/self/clear_refs``)
    and two steps run; transient = VmHWM − VmRSS before them.
    """
    import torch

    sys.path.insert(0, HERE)
    from models import make_problem
    from torch_steps import build_torch

    torch.set_num_threads(threads)
    pr = make_problem(problem, num_tasks, **(TINY[problem] if tiny else {}))
    stepper = build_torch(kind, pr.config, pr.params, pr.batch)
    stepper.step()
    persistent = sum(p.numel() * 4 * (2 if p.grad is not None else 1) for p in stepper.model.parameters())
    persistent += sum(t.numel() * t.element_size() for st in stepper.opt.state.values() for t in st.values()
                      if torch.is_tensor(t))
    buf = getattr(stepper, "grad_buffer", None)
    persistent += 0 if buf is None else buf.numel() * 4
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(2):
        stepper.step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"persistent_bytes": persistent, "rss_before_kib": before, "hwm_kib": peak, "hwm_reset": reset}))


def torch_rss(problem: str, num_tasks: int, kind: str, threads: int, tiny: bool = False) -> Optional[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--torch-rss", problem, str(num_tasks), kind]
    if tiny:
        cmd.append("--tiny")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        return {"error": str(e)[-300:]}


# --------------------------------------------------------------------------- main measurement


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def bandwidth_gbs(num_floats: int = 32 * 1024 * 1024) -> dict:
    """Streaming bandwidth of this machine through XLA: ``y = a·x + b·y`` (read 2, write 1) in GB/s."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.ones((num_floats,), jnp.float32)
    y = jnp.ones((num_floats,), jnp.float32)
    f = jax.jit(lambda x, y: 0.9 * y + 0.1 * x, donate_argnums=(1,))
    y = f(x, y).block_until_ready()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        y = f(x, y).block_until_ready()
        ts.append(time.perf_counter() - t0)
    t = float(np.median(ts))
    return {"floats": num_floats, "gbs": 3 * 4 * num_floats / t / 1e9, "ms": 1e3 * t}


def run_group(problem_name: str, num_tasks: int, variants: tuple, args: argparse.Namespace, threads: int) -> dict:
    from harness import (
        head_backward_flops, interleaved_times, iqr_ms, jax_runner, median_ms, torch_runner, transform_runner,
    )
    from models import make_problem

    pr = make_problem(problem_name, num_tasks, **(TINY[problem_name] if args.tiny else {}))
    res: dict = {"problem": problem_name, "T": num_tasks, "P_shared": pr.n_shared, "P_total": pr.n_params,
                 "variants": {}, "skipped": {}, "load_before": loadavg()}
    runners = []
    for v in variants:
        name, _, chunk = v.partition("@")
        chunk = int(chunk) if chunk else None
        base = name[4:] if name.startswith("sum:") else name
        if problem_name == "conv" and base in NAIVE and num_tasks > CONV_NAIVE_MAX_T:
            res["skipped"][v] = f"T² head backward passes on the conv problem above T={CONV_NAIVE_MAX_T}"
            continue
        if base.endswith("chunk") and chunk is not None and chunk >= num_tasks:
            res["skipped"][v] = f"chunk {chunk} ≥ T (same as the unchunked strategy)"
            continue
        if base.startswith("fused") and chunk is not None and chunk > 1 and num_tasks < 10:
            res["skipped"][v] = "fused chunk sweep (memory) only at T ≥ 10"
            continue
        log(f"{problem_name} T={num_tasks}: compiling {v}")
        r = jax_runner(pr, name, chunk_size=chunk)
        r.name = f"jax:{v}"
        r.info["chunk"] = chunk
        runners.append(r)
    tr = transform_runner(pr)
    runners.append(tr)
    if not args.no_torch and torch_available():
        for kind in ("ew", "dbmtl"):
            runners.append(torch_runner(pr, kind, threads))
    log(f"{problem_name} T={num_tasks}: timing {len(runners)} subjects × {args.reps} interleaved repetitions")
    interleaved_times(runners, reps=args.reps, block_s=0.01 if args.tiny else 0.1)
    for r in runners:
        entry = dict(r.info)
        entry.update(median_ms=median_ms(r), iqr_ms=iqr_ms(r), n=len(r.times))
        res["variants"][r.name] = entry
    # vmap/loop head-backward FLOPs need their own compiles; above T=10 they only confirm the T× trend.
    bases = [b for b in ("vmap", "loop", "trunk-loop") if f"jax:{b}" in res["variants"]
             and (b == "trunk-loop" or num_tasks <= 10)]
    if bases:
        log(f"{problem_name} T={num_tasks}: head-backward FLOPs for {bases}")
        hb = head_backward_flops(pr, bases)
        res["head_backward"] = {k: v for k, v in hb.items()}
    if not args.no_torch and not args.no_rss and torch_available():
        log(f"{problem_name} T={num_tasks}: PyTorch RSS subprocess")
        res["torch_rss"] = torch_rss(problem_name, num_tasks, "dbmtl", threads, args.tiny)
    res["load_after"] = loadavg()
    return res


def use_allocator(name: str) -> str:
    """Re-executes this process with the allocator preloaded (once); returns the allocator in use."""
    if name == "default":
        return "glibc malloc (default)"
    lib = MALLOC[name]
    if lib in os.environ.get("LD_PRELOAD", ""):
        return f"{name} ({lib}, LD_PRELOAD)"
    if not os.path.exists(lib):
        raise SystemExit(f"--malloc {name}: {lib} not found; install it (Debian: apt-get install libtcmalloc-minimal4).")
    env = dict(os.environ, LD_PRELOAD=(lib + " " + os.environ.get("LD_PRELOAD", "")).strip())
    os.execve(sys.executable, [sys.executable] + sys.argv, env)
    raise AssertionError("unreachable")


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    allocator = use_allocator(args.malloc)
    threads = pin_threads(args.threads)
    sys.path.insert(0, HERE)
    if args.torch_rss:
        prob, t, kind = args.torch_rss
        torch_rss_child(prob, int(t), kind, threads, args.tiny)
        return 0
    tasks = _parse_ints(args.tasks) if args.tasks else (QUICK_TASKS if args.quick else DEFAULT_TASKS)
    if args.reps is None:
        args.reps = 5 if args.quick else 7
    if args.tiny:
        args.out = args.out if args.out != os.path.join(HERE, "RESULTS.md") else os.path.join(HERE, "RESULTS.tiny.md")
    problems = [p for p in args.problems.split(",") if p]
    t_start = time.time()
    import jax

    meta = environment(threads, args)
    meta["allocator"] = allocator
    log(f"threads={threads}  load={loadavg()}  jax={jax.__version__}")
    meta["bandwidth"] = bandwidth_gbs(2**16 if args.tiny else 32 * 2**20)
    groups = []
    for prob in problems:
        default = MLP_VARIANTS if prob == "mlp" else CONV_VARIANTS
        variants = tuple(args.variants.split(",")) if args.variants else default
        for t in tasks:
            groups.append(run_group(prob, t, variants, args, threads))
            jax.clear_caches()
    meta["wall_s"] = time.time() - t_start
    meta["load_end"] = loadavg()
    results = {"meta": meta, "groups": groups}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    from report import write_report

    write_report(results, args.out)
    log(f"wrote {args.out} in {meta['wall_s']:.0f}s")
    return 0


def environment(threads: int, args: argparse.Namespace) -> dict:
    import importlib.metadata as md

    def ver(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = math.nan
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = "?"
    return {
        "command": "python benchmarks/run.py" + ("" if not sys.argv[1:] else " " + " ".join(shlex.quote(a) for a in sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpus_total": os.cpu_count(),
        "threads": threads,
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "versions": {p: ver(p) for p in ("jax", "jaxlib", "optax", "numpy", "torch")},
        "git": commit,
        "load_start": loadavg(),
        "reps": args.reps,
    }


if __name__ == "__main__":
    sys.exit(main())

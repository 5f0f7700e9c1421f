"""Tests of the benchmark suite's correctness (not its speed) and of the streaming gradient helpers.

* ``task_gradients._fold_task_grads`` / ``_trunk_heads_fold_task_grads`` against a
  NumPy back-propagation of a small MLP, for several chunk sizes and T;
* every JAX step variant of ``benchmarks/`` against a NumPy DB-MTL + Adam step;
* the fused (streamed) DB-MTL step against the library chain, state included;
* the LibMTL-style PyTorch steps against the JAX steps (skipped without torch);
* the report's derived numbers and an end-to-end ``run.py --tiny`` smoke run.

No timing is asserted anywhere.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

from dbmtl_jax.task_gradients import _fold_task_grads as fold_task_grads  # noqa: E402
from dbmtl_jax.task_gradients import _trunk_heads_fold_task_grads as trunk_heads_fold_task_grads  # noqa: E402
from dbmtl_jax.dbmtl import DBMTLState  # noqa: E402

import jax_steps  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402

TINY_MLP = dict(batch_size=8, d_in=5, hidden=7, d_feat=6, d_out=3)
TINY_CONV = dict(batch_size=2, image=8)
EPS = 1e-8


# --------------------------------------------------------------------------- NumPy reference


def np_mlp_task_grads(params: dict, batch: tuple, log: bool = True) -> tuple:
    """Raw losses, per-task trunk grads ``{leaf: [T, ...]}`` and per-head grads, by hand."""
    x, y = (np.asarray(a, np.float64) for a in batch)
    tp = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params["trunk"].items()}
    heads = [{n: np.asarray(v, np.float64) for n, v in h.items()} for h in params["heads"]]
    a1 = x @ tp["l1"]["w"] + tp["l1"]["b"]
    h1 = np.maximum(a1, 0)
    a2 = h1 @ tp["l2"]["w"] + tp["l2"]["b"]
    z = np.maximum(a2, 0)
    losses, trunk, head_grads = [], {"l1/w": [], "l1/b": [], "l2/w": [], "l2/b": []}, []
    for t, hp in enumerate(heads):
        out = z @ hp["w"] + hp["b"]
        loss = np.mean((out - y[t]) ** 2)
        losses.append(loss)
        dy = 2 * (out - y[t]) / out.size
        if log:
            dy = dy / (loss + EPS)
        head_grads.append({"w": z.T @ dy, "b": dy.sum(0)})
        da2 = (dy @ hp["w"].T) * (a2 > 0)
        da1 = (da2 @ tp["l2"]["w"].T) * (a1 > 0)
        trunk["l2/w"].append(h1.T @ da2)
        trunk["l2/b"].append(da2.sum(0))
        trunk["l1/w"].append(x.T @ da1)
        trunk["l1/b"].append(da1.sum(0))
    return np.array(losses), {k: np.stack(v) for k, v in trunk.items()}, head_grads


def np_dbmtl_adam(problem: models.Problem, steps: int, lr: float, beta: float = 0.9) -> dict:
    """NumPy DB-MTL (β constant, α = max) + Adam on the MLP problem; returns the final params."""
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), problem.params)
    flat, treedef = jax.tree_util.tree_flatten(params)
    m = [np.zeros_like(a) for a in flat]
    v = [np.zeros_like(a) for a in flat]
    ema = None
    for k in range(1, steps + 1):
        _, g_trunk, g_heads = np_mlp_task_grads(params, problem.batch)
        if ema is None:
            ema = {n: np.zeros_like(a) for n, a in g_trunk.items()}
        ema = {n: beta * ema[n] + (1 - beta) * g_trunk[n] for n in ema}
        norms = np.sqrt(sum((ema[n].reshape(problem.num_tasks, -1) ** 2).sum(1) for n in ema))
        scale = norms.max() / (norms + EPS)
        upd_trunk = {n: np.tensordot(scale, ema[n], axes=(0, 0)) for n in ema}
        upd = {
            "trunk": {"l1": {"b": upd_trunk["l1/b"], "w": upd_trunk["l1/w"]},
                      "l2": {"b": upd_trunk["l2/b"], "w": upd_trunk["l2/w"]}},
            "heads": tuple(g_heads),
        }
        u = jax.tree_util.tree_leaves(upd)
        out = []
        for i, (p, g) in enumerate(zip(flat, u)):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            mh, vh = m[i] / (1 - 0.9**k), v[i] / (1 - 0.999**k)
            out.append(p - lr * mh / (np.sqrt(vh) + 1e-8))
        flat = out
        params = jax.tree_util.tree_unflatten(treedef, flat)
    return params


def _collect_fold(num_tasks: int):
    """A fold that writes each chunk into a preallocated ``[T, ...]`` buffer (to compare with a reference)."""

    def fold(carry, start, grads):
        return jax.tree_util.tree_map(
            lambda buf, g: jax.lax.dynamic_update_slice_in_dim(buf, g, start, axis=0), carry, grads
        )

    return fold


def _zeros_like_tasks(tree, num_tasks):
    return jax.tree_util.tree_map(lambda a: jnp.zeros((num_tasks,) + np.shape(a), jnp.float32), tree)


# --------------------------------------------------------------------------- streaming helpers


@pytest.mark.parametrize("num_tasks,chunk,unroll", [(1, 1, False), (3, 1, False), (3, 2, False), (4, 4, False),
                                                    (5, 2, False), (5, 3, False), (3, 7, False), (5, 2, True)])
def test_fold_task_grads_matches_numpy(num_tasks, chunk, unroll):
    pr = models.make_mlp(num_tasks, **TINY_MLP)
    params, batch = jax_steps.to_jax(pr.params), jax_steps.to_jax(pr.batch)
    f = jax.jit(fold_task_grads(pr.loss_fn, _collect_fold(num_tasks), chunk_size=chunk, unroll=unroll))
    losses, got = f(_zeros_like_tasks(params, num_tasks), params, batch)
    ref_l, ref_trunk, ref_heads = np_mlp_task_grads(pr.params, pr.batch)
    np.testing.assert_allclose(losses, ref_l, rtol=1e-5)
    for leaf, ref in ref_trunk.items():
        a, b = leaf.split("/")
        np.testing.assert_allclose(got["trunk"][a][b], ref, rtol=2e-4, atol=1e-6)
    for t in range(num_tasks):
        for s in range(num_tasks):  # row t of head s: task t's gradient wrt head s (zero unless s == t)
            for n in ("w", "b"):
                exp = ref_heads[t][n] if s == t else np.zeros_like(ref_heads[t][n])
                np.testing.assert_allclose(got["heads"][s][n][t], exp, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("num_tasks,chunk,unroll", [(1, 1, False), (3, 1, False), (3, 2, False), (5, 2, False),
                                                    (4, 4, False), (3, 1, True), (5, 2, True)])
def test_trunk_heads_fold_matches_numpy(num_tasks, chunk, unroll):
    pr = models.make_mlp(num_tasks, **TINY_MLP)
    params, batch = jax_steps.to_jax(pr.params), jax_steps.to_jax(pr.batch)
    f = jax.jit(trunk_heads_fold_task_grads(pr.trunk_fn, pr.head_loss_fns, _collect_fold(num_tasks), chunk_size=chunk,
                                            unroll=unroll))
    losses, head_grads, got = f(_zeros_like_tasks(params["trunk"], num_tasks), params["trunk"], params["heads"], batch)
    ref_l, ref_trunk, ref_heads = np_mlp_task_grads(pr.params, pr.batch)
    np.testing.assert_allclose(losses, ref_l, rtol=1e-5)
    for leaf, ref in ref_trunk.items():
        a, b = leaf.split("/")
        np.testing.assert_allclose(got[a][b], ref, rtol=2e-4, atol=1e-6)
    for t in range(num_tasks):
        for n in ("w", "b"):
            np.testing.assert_allclose(head_grads[t][n], ref_heads[t][n], rtol=2e-4, atol=1e-6)


def test_fold_log_false_and_aux():
    pr = models.make_mlp(2, **TINY_MLP)
    params, batch = jax_steps.to_jax(pr.params), jax_steps.to_jax(pr.batch)

    def loss_aux(p, b):
        losses = pr.loss_fn(p, b)
        return losses, {"total": jnp.sum(losses)}

    f = jax.jit(fold_task_grads(loss_aux, _collect_fold(2), log=False, has_aux=True, chunk_size=1))
    (losses, aux), got = f(_zeros_like_tasks(params, 2), params, batch)
    ref_l, ref_trunk, _ = np_mlp_task_grads(pr.params, pr.batch, log=False)
    np.testing.assert_allclose(aux["total"], ref_l.sum(), rtol=1e-5)
    np.testing.assert_allclose(got["trunk"]["l1"]["w"], ref_trunk["l1/w"], rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, None])
def test_fold_rejects_bad_chunk(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        fold_task_grads(lambda p: p, lambda c, s, g: c, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        trunk_heads_fold_task_grads(lambda p, b: p, [lambda h, z, b: z], lambda c, s, g: c, chunk_size=bad)


def test_fold_rejects_non_vector_losses_and_head_mismatch():
    f = fold_task_grads(lambda p: jnp.sum(p), lambda c, s, g: c)
    with pytest.raises(ValueError, match="1-D vector"):
        f(None, jnp.ones(3))
    g = trunk_heads_fold_task_grads(lambda p, b: p, [lambda h, z, b: jnp.sum(h * z)] * 2, lambda c, s, gr: c)
    with pytest.raises(ValueError, match="head parameter sets"):
        g(None, jnp.ones(3), (jnp.ones(3),), None)
    with pytest.raises(ValueError, match="empty"):
        trunk_heads_fold_task_grads(lambda p, b: p, [], lambda c, s, gr: c)


@pytest.mark.parametrize("scale", [1e-10, 1e-5, 1.0, 1e5, 1e10])
def test_fold_finite_across_loss_scales(scale):
    # log(ℓ+ε) gradients are scale-invariant for ℓ ≫ ε, and finite for ℓ → 0.
    w = jnp.array([0.3, -0.7, 1.1])

    def losses(p):
        return scale * jnp.stack([jnp.sum(p**2), jnp.sum((p - 1.0) ** 2) + 1.0])

    f = jax.jit(fold_task_grads(losses, _collect_fold(2), chunk_size=1))
    _, g = f(jnp.zeros((2, 3)), w)
    assert np.all(np.isfinite(np.asarray(g)))
    zero = jax.jit(fold_task_grads(lambda p: scale * jnp.stack([jnp.sum(p * 0.0) + 1.0] * 2), _collect_fold(2)))
    _, gz = zero(jnp.ones((2, 3)), w)
    np.testing.assert_array_equal(np.asarray(gz), 0.0)


# --------------------------------------------------------------------------- benchmark steps


STEP_VARIANTS = ["vmap", "loop", "chunk", "trunk-vmap", "trunk-loop", "trunk-chunk", "fused", "fused-inplace",
                 "fused-unroll"]


@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_dbmtl_step_variants_match_numpy(variant):
    pr = models.make_mlp(3, **TINY_MLP)
    lr, steps = 1e-2, 3
    fns = jax_steps.build_step(pr, variant, chunk_size=2, learning_rate=lr)
    params, batch = jax_steps.to_jax(pr.params), jax_steps.to_jax(pr.batch)
    state = fns.init(params)
    step = jax.jit(fns.step, donate_argnums=(0, 1))
    struct0 = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), state)
    for _ in range(steps):
        params, state, losses = step(params, state, batch)
        assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), state) == struct0
    ref = np_dbmtl_adam(pr, steps, lr)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=2e-5)


def test_ew_step_matches_numpy():
    pr = models.make_mlp(2, **TINY_MLP)
    fns = jax_steps.build_step(pr, "ew", learning_rate=1e-3)
    params, batch = jax_steps.to_jax(pr.params), jax_steps.to_jax(pr.batch)
    new, _, losses = jax.jit(fns.step)(params, fns.init(params), batch)
    ref_l, g_trunk, g_heads = np_mlp_task_grads(pr.params, pr.batch, log=False)
    np.testing.assert_allclose(losses, ref_l, rtol=1e-5)
    # The first Adam step moves every parameter by lr·sign(g) (up to ε).
    exp = pr.params["trunk"]["l1"]["w"] - 1e-3 * np.sign(g_trunk["l1/w"].sum(0))
    np.testing.assert_allclose(new["trunk"]["l1"]["w"], exp, atol=1e-6)


@pytest.mark.parametrize(
    "maker,kw,num_tasks,chunk,fused",
    [
        (models.make_mlp, TINY_MLP, 1, 1, "fused"),
        (models.make_mlp, TINY_MLP, 3, 1, "fused"),
        (models.make_mlp, TINY_MLP, 5, 2, "fused-inplace"),
        (models.make_mlp, TINY_MLP, 3, 1, "fused-unroll"),
        (models.make_mlp, TINY_MLP, 5, 2, "fused-unroll"),
        (models.make_conv, TINY_CONV, 2, 1, "fused"),
        (models.make_conv, TINY_CONV, 3, 1, "fused-inplace"),
        (models.make_mlp, TINY_MLP, 3, 2, "sum:fused"),
    ],
)
def test_fused_step_equals_library_chain(maker, kw, num_tasks, chunk, fused):
    """The suite's fused subjects (the library's fused step, params {"trunk", "heads"} ↔ (trunk, heads)) give the
    parameters, EMA, norms and Adam moments of the library chain; the streamed sum those of the summed chain."""
    pr = maker(num_tasks, **kw)
    outs = []
    ref = "sum:trunk-loop" if fused.startswith("sum:") else "trunk-loop"
    for variant in (ref, fused):
        fns = jax_steps.build_step(pr, variant, chunk_size=chunk, learning_rate=1e-2)
        params, batch = jax_steps.to_jax(pr.params), jax_steps.to_jax(pr.batch)
        state = fns.init(params)
        step = jax.jit(fns.step)
        for _ in range(3):
            params, state, _ = step(params, state, batch)
        outs.append((params, state))
    (p_ref, s_ref), (p, s) = outs
    pairs = [(p_ref, p)]
    if ref == "trunk-loop":
        assert isinstance(s[0], DBMTLState) and int(s[0].count) == int(s_ref[0].count) == 3
        pairs += [(s_ref[0].ema["trunk"], s[0].ema[0]), (s_ref[0].norms, s[0].norms),
                  (s_ref[1][0].mu["trunk"], s[1][0].mu[0]), (s_ref[1][0].nu["heads"], s[1][0].nu[1])]
    else:
        pairs += [(s_ref[0].mu, s[0].mu)]
    for i, (a_tree, b_tree) in enumerate(pairs):
        # Parameters: Adam's first steps move a coordinate by ≈ lr·g/(|g| + 1e-8), so where a head gradient is
        # ~1e-9 a rounding-level difference of the two programs' reductions moves it by up to ~lr·1e-4.
        atol = 5e-6 if i == 0 else 1e-6
        for a, b in zip(jax.tree_util.tree_leaves(a_tree), jax.tree_util.tree_leaves(b_tree), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol)


def test_build_step_rejects_unknown_and_missing_chunk():
    pr = models.make_mlp(2, **TINY_MLP)
    with pytest.raises(ValueError, match="unknown variant"):
        jax_steps.build_step(pr, "fast")
    with pytest.raises(ValueError, match="chunk_size"):
        jax_steps.build_step(pr, "fused")
    with pytest.raises(ValueError, match="not a variant"):
        jax_steps.build_step(pr, "sum:ew")


def test_problem_sizes_match_the_issue():
    pr = models.make_mlp(3)
    assert pr.n_shared == 512 * 1024 + 1024 + 1024 * 512 + 512 == 1_050_112
    assert pr.batch[0].shape == (256, 512)
    conv = models.make_conv(2)
    trunk = conv.n_shared
    heads = conv.n_params - trunk
    assert heads / 2 > trunk  # each head is heavier than the trunk


# --------------------------------------------------------------------------- PyTorch reference


@pytest.mark.parametrize(
    "maker,kw,tol,kind",
    [
        (models.make_mlp, TINY_MLP, 1e-5, "ew"),
        (models.make_mlp, TINY_MLP, 1e-5, "dbmtl"),
        (models.make_conv, TINY_CONV, 1e-4, "dbmtl"),
    ],
)
def test_torch_steps_match_jax(maker, kw, tol, kind):
    pytest.importorskip("torch")
    import torch_steps

    pr = maker(3, **kw)
    fns = jax_steps.build_step(pr, "ew" if kind == "ew" else "trunk-loop", learning_rate=1e-2)
    params, batch = jax_steps.to_jax(pr.params), jax_steps.to_jax(pr.batch)
    state = fns.init(params)
    step = jax.jit(fns.step)
    ts = torch_steps.build_torch(kind, pr.config, pr.params, pr.batch, lr=1e-2)
    for _ in range(3):
        params, state, losses = step(params, state, batch)
        tl = ts.step()
        np.testing.assert_allclose(np.asarray(losses), tl.numpy(), rtol=1e-5)
    ref = ts.params_numpy()
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), b, atol=tol * 10, rtol=tol)


# --------------------------------------------------------------------------- report / run.py


def _group(ew_ms, s_ms, ew_flops, s_flops, torch_ms):
    return {
        "problem": "mlp", "T": 3, "P_shared": 1000, "P_total": 1100, "load_before": "0", "load_after": "0",
        "skipped": {},
        "variants": {
            "jax:ew": {"median_ms": ew_ms, "flops": ew_flops, "iqr_ms": (ew_ms, ew_ms), "compile_s": 1.0,
                       "memory": {"peak": 4000 * 5, "argument": 0, "temp": 0, "output": 0, "alias": 0},
                       "state_bytes": 4000 * 3, "batch_bytes": 0},
            "jax:trunk-loop": {"median_ms": s_ms, "flops": s_flops, "iqr_ms": (s_ms, s_ms), "compile_s": 1.0,
                               "memory": {"peak": 4000 * 12, "argument": 0, "temp": 0, "output": 0, "alias": 0},
                               "state_bytes": 4000 * 6, "batch_bytes": 4000},
            "torch:dbmtl": {"median_ms": torch_ms, "iqr_ms": (torch_ms, torch_ms)},
        },
    }


def test_report_efficiency_and_transient():
    g = _group(ew_ms=10.0, s_ms=25.0, ew_flops=1e9, s_flops=2.2e9, torch_ms=40.0)
    assert report.efficiency(g, "jax:trunk-loop") == pytest.approx(10.0 * 2.2 / 25.0)
    assert report.transient_p(g, "jax:trunk-loop") == pytest.approx((12 - 6 - 1) * 4000 / (4 * 1000))
    meta = {"command": "x", "date": "d", "git": "g", "cpu": "c", "cpus_total": 2, "threads": 2, "mem_gib": 1.0,
            "python": "3", "versions": {k: "1" for k in ("jax", "jaxlib", "optax", "numpy", "torch")},
            "load_start": "0", "load_end": "0", "bandwidth": {"floats": 2**20, "gbs": 1.0}, "reps": 3}
    text = report.render({"meta": meta, "groups": [g]})
    assert "| `jax:trunk-loop` | 2.20 / 0.88 |" in text
    assert "MLP T=3: DB-MTL step ≤ 0.7× PyTorch (library) | `trunk-loop`: 0.62× | met" in text
    slow = _group(ew_ms=10.0, s_ms=35.0, ew_flops=1e9, s_flops=2.2e9, torch_ms=40.0)
    assert "| `trunk-loop`: 0.88× | **not met** |" in report.render({"meta": meta, "groups": [slow]})


def test_run_py_tiny_end_to_end(tmp_path):
    import run

    out, js = tmp_path / "R.md", tmp_path / "R.json"
    rc = run.main(["--tiny", "--problems", "mlp", "--tasks", "2", "--reps", "1", "--no-torch", "--threads", "1",
                   "--variants", "ew,trunk-loop", "--out", str(out), "--json", str(js)])
    assert rc == 0
    text = out.read_text()
    for section in ("### 1. Step time", "### 2. FLOP floor", "### 4. Peak memory", "### 5. Compile time",
                    "### 6. Head-backward FLOPs", "jax:transform-only"):
        assert section in text
    res = json.loads(js.read_text())
    g = res["groups"][0]
    assert g["T"] == 2 and all(np.isfinite(v["median_ms"]) for v in g["variants"].values())
    assert g["variants"]["jax:trunk-loop"]["flops"] > g["variants"]["jax:ew"]["flops"]


# --------------------------------------------------------------------------- bench_methods.py / bench_loss_weighting.py


def test_bench_methods_tiny_end_to_end(tmp_path):
    import bench_methods
    import harness

    out = tmp_path / "M.md"
    assert bench_methods.main(["--tiny", "--tasks", "2", "--reps", "2", "--steps", "1", "--methods", "ew,dbmtl",
                               "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| ew (one backward)", "| ew", "| dbmtl"]
    assert rows[0].split(" | ")[3] == "1.00×"  # the reference's paired ratio to itself
    r = harness.Runner("x", lambda n: None, times=[1.0, 2.0, 4.0])
    assert harness.paired_ratio(r, harness.Runner("y", lambda n: None, times=[2.0, 2.0, 2.0])) == 1.0


def test_bench_loss_weighting_tiny_end_to_end(tmp_path):
    import bench_loss_weighting

    out = tmp_path / "LW.md"
    assert bench_loss_weighting.main(["--tiny", "--reps", "2", "--steps", "1", "--methods", "uw", "--out", str(out)]) == 0
    text = out.read_text()
    names = [line.split(" | ")[0][2:] for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert names == ["ew", "sum (no transform)", "uw"]
    assert "| ew | " in text and "| baseline |" in text

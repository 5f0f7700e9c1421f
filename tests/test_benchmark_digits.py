"""The ``multimnist_digits`` benchmark (10 binary digit-presence tasks) on a synthetic stand-in for the pairs."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dbmtl_jax.experiments as ex
from dbmtl_jax.experiments import builtin as bm


def _fake_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=(n, 2)).astype(np.int32)
    return rng.random((n, 28, 28, 1), dtype=np.float32), y


def test_digit_presence_labels_model_loss_and_metric(monkeypatch):
    (xt, yt), (xv, yv), (xs, ys) = _fake_pairs(80, 0), _fake_pairs(12, 1), _fake_pairs(16, 2)
    fake = types.SimpleNamespace(x_train=xt, y_train=yt, x_val=xv, y_val=yv, x_test=xs, y_test=ys)
    monkeypatch.setattr(bm, "_paired", lambda name: fake)
    bench = ex.get_benchmark("multimnist_digits")
    assert bench.num_tasks == 10 and [t.name for t in bench.tasks] == [f"digit{k}" for k in range(10)]
    assert bench.recipe.max_train_examples == 2000

    splits = bench.data(bench.recipe)
    x, targets = splits._data["test"]
    for k in range(10):  # task k is positive exactly when digit k is the left or the right one
        np.testing.assert_array_equal(targets[k], ((ys[:, 0] == k) | (ys[:, 1] == k)).astype(np.float32))

    model = bench.model(nnx.Rngs(0))
    outs = model(jnp.asarray(x))
    assert len(outs) == 10 and outs[0].shape == (16, 1)
    for task, out, tgt in zip(bench.tasks, outs, targets):
        loss = task.loss(out, jnp.asarray(tgt))
        logit = np.asarray(out[:, 0], np.float64)
        ref = np.mean(np.maximum(logit, 0) - logit * tgt + np.log1p(np.exp(-np.abs(logit))))
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
        metric = task.metric()
        state = metric.update(metric.init(), *task.metric_input(out, jnp.asarray(tgt)))
        result = metric.compute(state)
        auc, bound = float(result["auc"]), float(result["auc_error_bound"])
        pos, neg = logit[tgt > 0.5], logit[tgt < 0.5]
        if len(pos) and len(neg):
            exact = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
            assert abs(auc - exact) <= bound + 1e-6
    g = jax.grad(lambda m: bench.tasks[3].loss(m(jnp.asarray(x))[3], jnp.asarray(targets[3])))(model)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))

"""The README's Python examples run as written (issue 14 item 8).

The first block is self-contained and runs verbatim; the fragments after it run on top of a small
context (``params``, ``task_losses``, gradients) that the README's prose describes.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")

import dbmtl_jax  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(starts: str) -> str:
    (code,) = [b for b in _blocks() if b.lstrip().startswith(starts)]
    return code


def _context() -> dict:
    """``params`` with a shared ``trunk`` and per-task ``heads``, ``task_losses(params, batch) -> [3]``."""
    rng = np.random.default_rng(0)
    params = {"trunk": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
              "heads": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)}

    def task_losses(p, batch):
        x, y = batch
        z = jnp.tanh(x @ p["trunk"])
        return jnp.mean((z @ p["heads"].T - y) ** 2, axis=0)

    batch = (jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), jnp.asarray(rng.normal(size=(16, 3)), jnp.float32))
    return dict(jax=jax, jnp=jnp, optax=optax, dbmtl_jax=dbmtl_jax, functools=functools, params=params,
                task_losses=task_losses, batch=batch)


def test_usage_example_runs_with_batch_norm():
    """The usage block's step with a BatchNorm trunk (the library's own norm="batch"): the old form, merge without
    copy=True inside the differentiated function, raised flax's TraceContextError; the statistics now move."""
    code = _block("import jax")
    assert "MLPEncoder(16, (64, 64), rngs=rngs)" in code
    ns: dict = {}
    exec(compile(code.replace("MLPEncoder(16, (64, 64), rngs=rngs)",  # noqa: S102 - the README's own code
                              'MLPEncoder(16, (64, 64), norm="batch", rngs=rngs)'), "README.md", "exec"), ns)
    nnx = ns["nnx"]
    stats = jax.tree.map(np.asarray, nnx.state(ns["model"], nnx.BatchStat))
    assert jax.tree.leaves(stats)
    ns["train_step"](ns["model"], ns["optimizer"], ns["x"], ns["y"])
    after = jax.tree.map(np.asarray, nnx.state(ns["model"], nnx.BatchStat))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(after)))


def test_usage_example_runs_as_written():
    ns: dict = {}
    exec(compile(_block("import jax"), "README.md", "exec"), ns)  # noqa: S102 - the README's own code
    losses = np.asarray(ns["losses"])
    assert losses.shape == (3,) and np.all(np.isfinite(losses))
    before = jax.tree.map(np.asarray, ns["nnx"].state(ns["model"], ns["nnx"].Param))
    ns["train_step"](ns["model"], ns["optimizer"], ns["x"], ns["y"])
    after = jax.tree.map(np.asarray, ns["nnx"].state(ns["model"], ns["nnx"].Param))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_fused_step_example_runs_and_matches_the_chain():
    ns = _context()
    exec(compile(_block("import functools\n\ndef loss_fn"), "README.md", "exec"), ns)  # noqa: S102
    params, state = ns["params"], ns["state"]
    rng = np.random.default_rng(1)
    batch = (jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
             tuple(jnp.asarray(rng.normal(size=16), jnp.float32) for _ in range(3)))
    chain = optax.chain(dbmtl_jax.dbmtl(3, shared=lambda path: path.startswith("trunk")), optax.adam(1e-4))
    c_params = jax.tree.map(jnp.array, ns["params"])  # a copy: the README's step donates its inputs
    c_state = chain.init(c_params)
    for _ in range(3):
        params, state, losses = ns["train_step"](params, state, batch)
        _, grads = dbmtl_jax.value_and_task_grads(ns["loss_fn"])(c_params, batch)
        updates, c_state = chain.update(grads, c_state, c_params)
        c_params = optax.apply_updates(c_params, updates)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(c_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_skip_invalid_steps_example_runs():
    ns = _context()
    p = ns["params"]
    ns["losses"], ns["task_grads"] = dbmtl_jax.value_and_task_grads(ns["task_losses"])(p, ns["batch"])
    ns["opt_state"] = dbmtl_jax.skip_invalid_steps(optax.chain(dbmtl_jax.dbmtl(3), optax.adam(1e-4))).init(p)
    exec(compile(_block("tx = dbmtl_jax.skip_invalid_steps"), "README.md", "exec"), ns)  # noqa: S102
    assert all(np.all(np.isfinite(u)) and np.any(u != 0) for u in jax.tree.leaves(ns["updates"]))
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), ns["task_grads"])  # a NaN gradient: skipped, state kept
    updates, state = ns["tx"].update(bad, ns["opt_state"], p, losses=ns["losses"])
    assert all(np.all(u == 0) for u in jax.tree.leaves(updates))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.inner_state),
                                                    jax.tree.leaves(ns["opt_state"].inner_state)))


def test_linen_train_state_example_forwards_losses_and_key():
    """TrainState.apply_gradients does not forward losses=/key= to tx.update; the README's step calls it itself."""
    import types

    ns = _context()
    ns["model"] = types.SimpleNamespace(apply=None)
    exec(compile(_block("from flax.training import train_state"), "README.md", "exec"), ns)  # noqa: S102
    state0 = ns["state"]
    state, losses = ns["train_step"](state0, ns["batch"], jax.random.key(0))
    assert int(state.step) == 1 and int(state.opt_state.num_skipped) == 0
    uw = dbmtl_jax.loss_weighting.find_loss_weighting_state(state.opt_state)
    uw0 = dbmtl_jax.loss_weighting.find_loss_weighting_state(state0.opt_state)
    assert not np.array_equal(uw.log_var, uw0.log_var)  # the losses reached UW
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state0.params)))
    # what apply_gradients gives: the errors say why (uw needs losses=, pcgrad and rlw a key=)
    _, grads = dbmtl_jax.value_and_task_grads(ns["task_losses"], log=False)(state0.params, ns["batch"])
    for tx in (ns["tx"], optax.chain(dbmtl_jax.get_method("pcgrad", 3), optax.sgd(0.1)),
               optax.chain(dbmtl_jax.get_method("rlw", 3), optax.sgd(0.1))):
        st = state0.replace(tx=tx, opt_state=tx.init(state0.params))
        with pytest.raises(ValueError, match="TrainState.apply_gradients does not forward extra arguments"):
            st.apply_gradients(grads=grads)


def test_per_group_learning_rates_example_keeps_dbmtl_over_all_shared_parameters():
    ns = _context()
    exec(compile(_block("tx = optax.chain(\n    dbmtl_jax.dbmtl"), "README.md", "exec"), ns)  # noqa: S102
    params, tx = ns["params"], ns["tx"]
    _, grads = dbmtl_jax.value_and_task_grads(ns["task_losses"])(params, ns["batch"])
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params)
    for lr, group in ((1e-4, "trunk"), (1e-3, "heads")):
        ref = optax.chain(dbmtl_jax.dbmtl(3, shared=lambda path: path.startswith("trunk")), optax.adam(lr))
        v, _ = ref.update(grads, ref.init(params), params)
        np.testing.assert_allclose(u[group], v[group], rtol=1e-6)

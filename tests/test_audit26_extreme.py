"""Audit 26: finite inputs whose intermediates overflow (or underflow) in float32.

"Guard what you produce, not only what you receive": each test feeds finite
per-task gradients and checks that the method either returns the right finite
update or makes the step visibly invalid (NaN update, state kept), never a
finite wrong update or a state poisoned for good.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dbmtl_jax


def _same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in zip(la, lb))


def test_mtadam_overflowing_second_moment_is_rejected_and_the_state_kept():
    """Gradient entries of 1e30 are finite, their squares (MTAdam's second moments) are not: the update was a
    finite 0 (m / inf) with inf in the state, which froze every later update at 0.  Now the step is invalid
    (NaN update, state kept) and the run goes on from the old state, as GradNorm's and ExcessMTL's."""
    params = {"w": jnp.zeros(3)}
    g = {"w": jnp.asarray([[1.0, -2.0, 0.5], [0.3, 1.0, -1.0]], jnp.float32)}
    big = jax.tree.map(lambda x: x * 1e30, g)
    assert bool(jnp.all(jnp.isfinite(big["w"])))
    tx = dbmtl_jax.get_method("mtadam", 2)
    update = jax.jit(tx.update)
    _, state = update(g, tx.init(params), params)
    u, new = update(big, state, params)
    assert bool(jnp.all(jnp.isnan(u["w"]))) and _same(new, state)
    u, state = update(g, new, params)  # the next ordinary step is finite and non-zero
    assert bool(jnp.all(jnp.isfinite(u["w"]))) and bool(jnp.any(u["w"] != 0))


def test_moco_lambda_step_is_exact_when_the_raw_gram_matrix_overflows():
    """MoCo's λ step uses the raw Y Yᵀ; for ‖y‖ ≈ 1e25 it overflows (inf, and 0·inf = NaN off the diagonal)
    and the projection read every entry as a tie: λ silently uniform.  The exact step drives λ to the task
    with the smaller (Y Yᵀ λ)_t, here task 0 (orthogonal gradients, task 1 twice as long): λ = (1, 0)."""
    s = 1e25
    params = {"w": jnp.zeros(3)}
    g = {"w": jnp.asarray([[s, 0.0, 0.0], [0.0, 2 * s, 0.0]], jnp.float32)}
    tx = dbmtl_jax.get_method("moco", 2)
    u, state = jax.jit(tx.update)(g, tx.init(params), params)
    # step 1: β_1 = 0.5, y = g / 2; z = λ − 0.1 Y Yᵀ λ = (0.5 − 1.25e48, 0.5 − 5e48) → λ = (1, 0), d = y_0
    np.testing.assert_array_equal(np.asarray(state.lambd), [1.0, 0.0])
    np.testing.assert_allclose(np.asarray(u["w"]), [0.5 * s, 0.0, 0.0], rtol=1e-6)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="FairGrad's weights are returned on the raw gradient scale in float32: "
                   "w_t = ‖g_t‖^(-4/3) (α = 2) is below the smallest float32 for ‖g_t‖ ≳ 1e34 (and flushed to "
                   "0 by XLA:CPU below 1.2e-38, ‖g_t‖ ≳ 3e28), so the update is a silent 0 although it is "
                   "~‖g_t‖^(-1/3); only state.residual (≥ 1) says so. Not fixed: needs the weights in a "
                   "scaled form through power_balance, balance_transform and make_gradient_transform.")
def test_fairgrad_update_is_not_silently_zero_for_huge_gradients():
    s = 1e36
    params = {"w": jnp.zeros(2)}
    g = {"w": jnp.asarray([[s, 0.0], [0.0, s]], jnp.float32)}  # orthogonal: w_t = s^(-4/3), d = s^(-1/3) (1, 1)
    tx = dbmtl_jax.get_method("fairgrad", 2, max_norm=0.0)
    u, _ = jax.jit(tx.update)(g, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(u["w"]), [s ** (-1 / 3)] * 2, rtol=1e-3)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="DB-MTL's task norms (task_axis.norms_from_pair) "
                   "guard the overflow of the sum of squares but not its underflow: a task norm below ~1e-19 "
                   "(float32) comes out 0, and with eps below it the task's ĝ_t / (‖ĝ_t‖ + ε) is ‖ĝ_t‖/ε times "
                   "too large. Harmless at the default eps=1e-8. Not fixed here: the fix belongs in "
                   "dbmtl_jax/task_axis.py (shared with the fused step), outside dbmtl_jax/methods.")
def test_dbmtl_tiny_task_norm_with_a_small_eps_does_not_explode():
    params = {"w": jnp.zeros(2)}
    g = {"w": jnp.asarray([[1.0, 0.0], [0.0, 1e-25]], jnp.float32)}
    tx = dbmtl_jax.dbmtl(2, beta=0.0, eps=1e-30)  # β = 0: the EMA is the gradient
    u, _ = jax.jit(tx.update)(g, tx.init(params), params)
    # α = max_t ‖ĝ_t‖ = 1, d = Σ_t ĝ_t / (‖ĝ_t‖ + ε) = (1, 1e-25 / (1e-25 + 1e-30)) ≈ (1, 1); computed (1, 1e5)
    np.testing.assert_allclose(np.asarray(u["w"]), [1.0, 1.0], rtol=1e-4)

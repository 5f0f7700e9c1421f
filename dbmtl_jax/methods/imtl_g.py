"""IMTL-G: impartial multi-task learning, gradient part (closed form).

Reference: L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao,
W. Zhang, "Towards Impartial Multi-task Learning", ICLR 2021.

Find weights ``α`` with ``Σ_t α_t = 1`` such that the aggregated gradient
``g = Σ_t α_t g_t`` has equal projections onto all unit task gradients
``u_t = g_t / ‖g_t‖``: ``⟨g, u_1⟩ = ⟨g, u_t⟩`` for every ``t``.  The paper's
closed form (with ``D = [g_1 − g_t]ᵀ``, ``U = [u_1 − u_t]ᵀ``, ``t = 2..T``)::

    α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹,     α_1 = 1 − Σ_{t≥2} α_t

is the solution of the ``T × T`` linear system ``M α = e`` whose rows are
``(u_1 − u_t)ᵀ G`` (``t ≥ 2``) and ``1ᵀ`` (``G`` = matrix of task gradients).
Only the shared parameters are reweighted (as in the paper and LibMTL); head
leaves get the plain ``Σ_t g_t``.

Numerical choices (not in the paper): the system is built from the Gram
matrix of the global shared gradient and solved in the preconditioned
variables ``β_t = α_t ‖g_t‖ / n_min`` (``n_min`` the smallest nonzero norm):
with ``C`` the matrix of cosines between the task gradients the rows are
``(C_1 − C_t) β = 0`` (``t ≥ 2``) and ``Σ_t (n_min / ‖g_t‖) β_t = 1``, so every
coefficient is at most 1 in magnitude whatever the relative scale of the
tasks.  (Written on the raw Gram matrix, the columns of ``M`` scale with
``‖g_t‖``, and the SVD cut-off of least squares drops the small tasks: with
norms 10^±6 apart the old form returned projections differing by more than
the update's norm.)  The system is solved by SVD least squares
(``jnp.linalg.lstsq``), which equals the closed form when ``D Uᵀ`` is
invertible and gives the minimum-norm solution for collinear gradients
instead of the NaNs of an explicit inverse; ``α`` is then rescaled to sum to
1 exactly.  Tasks whose gradient is exactly zero have no unit vector; their
equal-projection row is replaced by ``α_t = 0`` and the first nonzero task
takes the role of task 1.  With all gradients zero, ``α = 1/T``.

Residual (kept in the state): the spread ``max_t ⟨d, u_t⟩ − min_t ⟨d, u_t⟩``
of the projections over the nonzero tasks divided by ``‖d‖`` (a cosine;
widened by a rounding margin ``(4 + 2√T) ε (|C||β|)_t`` on every projection),
or ``|Σ α − 1|`` if larger: a bound, so a residual ``r`` certifies
``|⟨d, u_t⟩ − ⟨d, u_s⟩| ≤ r ‖d‖`` for all tasks.  It is of order 1 or more for
inconsistent (degenerate) systems and when ``d`` is numerically zero (e.g.
``g_2 = −g_1``, where equal projections force ``d = 0``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from dbmtl_jax import task_axis as ta
from dbmtl_jax.methods import _gradient_common as gc
from dbmtl_jax.methods import _numerics as nm
from dbmtl_jax.methods import _qp

PyTree = Any

__all__ = ["IMTLGState", "imtl_g", "imtl_g_weights"]


class IMTLGState(NamedTuple):
    """State of :func:`imtl_g`.

    Attributes:
      count: number of updates so far (int32).
      weights: ``α`` of the last update, float32 ``[T]``.
      residual: relative spread of the projections (a cosine bound, see the module
        docstring; float32).
    """

    count: chex.Array
    weights: chex.Array
    residual: chex.Array


@nm.highest_precision
def imtl_g_weights(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    """IMTL-G weights from a Gram matrix: ``(α [T], residual)`` (see the module docstring)."""
    t = gram.shape[0]
    dt = gram.dtype
    cos, nrm = _qp.precondition_gram(gram)
    active = nrm > 0
    nmin = jnp.min(jnp.where(active, nrm, jnp.inf))
    a = jnp.where(active, nmin / jnp.where(active, nrm, 1.0), 0.0)  # α = a ⊙ β
    ref = jnp.argmax(active)
    eye = jnp.eye(t, dtype=dt)
    is_ref = jnp.arange(t) == ref
    m = jnp.where(active[:, None], cos[ref][None, :] - cos, eye)
    m = jnp.where(is_ref[:, None], a[None, :], m)
    beta = jnp.linalg.lstsq(m, is_ref.astype(dt))[0]
    beta = jnp.where(active & jnp.isfinite(beta), beta, 0)
    total = jnp.sum(a * beta)
    ok = jnp.isfinite(total) & (jnp.abs(total) > jnp.finfo(dt).tiny)
    beta = jnp.where(ok, beta / jnp.where(ok, total, 1), beta)
    alpha = a * beta
    # spread of the projections ⟨d, u_t⟩ ∝ (Cβ)_t over ‖d‖ ∝ ‖β‖_C, widened by the rounding margin
    proj = jnp.matmul(cos, beta, precision=nm.HIGHEST)
    err = (4.0 + 2.0 * t**0.5) * jnp.finfo(dt).eps * jnp.matmul(jnp.abs(cos), jnp.abs(beta), precision=nm.HIGHEST)
    # ‖d‖² = βᵀCβ less its own rounding margin |β|ᵀ err: when the weights cancel, βᵀCβ is rounding noise, and
    # dividing by its square root made a numerically zero d look converged
    dn2 = jnp.dot(beta, proj, precision=nm.HIGHEST) - jnp.dot(jnp.abs(beta), err, precision=nm.HIGHEST)
    dn = jnp.sqrt(jnp.maximum(dn2, 0))
    spread = jnp.max(jnp.where(active, proj + err, -jnp.inf)) - jnp.min(jnp.where(active, proj - err, jnp.inf))
    resid = jnp.where(dn > 0, spread / jnp.where(dn > 0, dn, 1), jnp.where(spread > 0, 1e30, 0))
    resid = jnp.minimum(jnp.maximum(resid, jnp.abs(jnp.sum(alpha) - 1)), 1e30)
    any_active = jnp.any(active)
    alpha = jnp.where(any_active, alpha, jnp.full([t], 1.0 / t, dt))
    return alpha, jnp.where(any_active, resid, 0)


def imtl_g(num_tasks: int, *, shared: ta.SharedSpec = None) -> optax.GradientTransformationExtraArgs:
    """IMTL-G (Liu et al., ICLR 2021); no hyperparameters.

    Args:
      num_tasks: ``T``, the size of the leading task axis of every update leaf.
      shared: which leaves are shared; default all.  Head leaves get ``Σ_t g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args are ignored.
    """
    nm.check_num_tasks(num_tasks, "imtl_g")

    def init_state(params: PyTree) -> IMTLGState:
        del params
        return IMTLGState(
            count=jnp.zeros([], jnp.int32),
            weights=jnp.full([num_tasks], 1.0 / num_tasks, jnp.float32),
            residual=jnp.zeros([], jnp.float32),
        )

    def weighting(gram: jax.Array, state: IMTLGState, **_: Any) -> tuple[jax.Array, dict]:
        alpha, r = imtl_g_weights(gram)
        return alpha, dict(weights=alpha.astype(jnp.float32), residual=r.astype(jnp.float32))

    return gc.make_gradient_transform(
        "imtl_g", num_tasks, weighting, init_state, shared=shared, keep_when_no_shared=True
    )

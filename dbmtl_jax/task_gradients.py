"""Per-task gradients of ``log(ℓ_t + ε)`` inside one jitted step.

DB-MTL (Lin et al., "Dual-Balancing for Multi-Task Learning", Alg. 1 step 6)
needs ``g_t = ∇_θ log(ℓ_t + ε)`` for every task ``t``.  Instead of T separate
backward passes, :func:`value_and_task_grads` runs one forward pass and then
pulls back the T one-hot cotangents together, which XLA turns into batched
matrix products.  The model is given either way:

* as ``loss_fn(params, *args) -> [T]``, the vector of task losses;
* as a :class:`TrunkHeads` spec, a shared trunk and T head losses: each head is
  differentiated once for its own task and only the trunk pull-back is run
  per task, so heavy heads (dense decoders) are not back-propagated T times.

:func:`dbmtl_jax.fused_dbmtl` takes the same two forms and streams the
per-task gradients into the EMA instead of returning the ``[T, P]`` stack
(:func:`_fold_task_grads`, :func:`_trunk_heads_fold_task_grads`).

The log transform can be turned off (``log=False``) for the paper's ablation and
for methods that want raw-loss gradients.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "TrunkHeads",
    "value_and_task_grads",
    "transform_losses",
    "STRATEGIES",
    # Deprecated in 0.2.0, removed in 0.3.0:
    "trunk_heads_task_grads",
    "heads_to_task_axis",
    "fold_task_grads",
    "trunk_heads_fold_task_grads",
]

STRATEGIES = ("vmap", "loop")


def _deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} is deprecated (0.2.0; removed in 0.3.0): use {new}.", DeprecationWarning,
                  stacklevel=stacklevel)


class TrunkHeads(NamedTuple):
    """A hard-parameter-sharing model given as a shared trunk and T heads.

    ``trunk_fn(trunk_params, batch) -> features`` is the shared encoder θ and
    ``head_loss_fns[t](head_params[t], features, batch) -> ℓ_t`` (a scalar) the
    head ψ_t and loss of task ``t``, so ``ℓ_t = L_t(ψ_t, trunk(θ))``.

    The parameters are ``params = (trunk_params, head_params)`` unless
    ``split``/``join`` say otherwise: ``split(params) -> (trunk_params,
    head_params)`` and ``join(trunk_tree, head_trees) -> tree`` with the
    structure of ``params`` (for example ``{"trunk": …, "heads": …}``, or an
    NNX model's state, see :func:`dbmtl_jax.architectures.hps_spec`).
    """

    trunk_fn: Callable[[PyTree, Any], Any]
    head_loss_fns: Sequence[Callable[[PyTree, Any, Any], jax.Array]]
    split: Optional[Callable[[PyTree], tuple[PyTree, Sequence[PyTree]]]] = None
    join: Optional[Callable[[PyTree, Sequence[PyTree]], PyTree]] = None

    @property
    def num_tasks(self) -> int:
        """``T``, the number of heads."""
        return len(self.head_loss_fns)

    def _check_split_join(self) -> None:
        if (self.split is None) != (self.join is None):
            given, missing = ("split", "join") if self.join is None else ("join", "split")
            raise ValueError(
                f"TrunkHeads: {given} was given without {missing}; give both (split(params) -> (trunk, heads) and "
                "join(trunk, heads) -> a tree like params) or neither (params = (trunk, heads))."
            )

    def parts(self, params: PyTree) -> tuple[PyTree, Sequence[PyTree]]:
        """``(trunk_params, head_params)`` of ``params``."""
        self._check_split_join()
        if self.split is not None:
            return self.split(params)
        if not (isinstance(params, (tuple, list)) and len(params) == 2):
            raise ValueError(
                f"params must be (trunk_params, head_params) with one head per task ({self.num_tasks} head losses), "
                f"got {type(params).__name__}" + (f" of length {len(params)}" if isinstance(params, (tuple, list)) else "")
                + "; for another layout give split= and join=."
            )
        heads = params[1]
        if not isinstance(heads, (tuple, list)):
            raise ValueError(
                f"head_params (params[1]) must be a tuple or list of {self.num_tasks} head parameter trees, in the "
                f"order of head_loss_fns, got {type(heads).__name__}; for heads in a dict give split= and join=."
            )
        if len(heads) != self.num_tasks:
            raise ValueError(
                f"params must be (trunk_params, head_params) with one head per task: {self.num_tasks} head losses, "
                f"got {len(heads)} head parameter sets."
            )
        return params[0], heads

    def whole(self, params: PyTree, trunk: PyTree, heads: Sequence[PyTree]) -> PyTree:
        """The tree with ``params``' structure holding ``trunk`` and ``heads`` (inverse of :meth:`parts`)."""
        self._check_split_join()
        if self.join is not None:
            return self.join(trunk, heads)
        container = jax.tree_util.tree_structure(params[1], is_leaf=lambda x: x is not params[1])
        pair = (trunk, jax.tree_util.tree_unflatten(container, list(heads)))
        return list(pair) if isinstance(params, list) else pair

    def shared_mask(self, params: PyTree) -> PyTree:
        """``shared=`` mask of ``params`` for :func:`dbmtl_jax.dbmtl`: True on trunk leaves, False on heads."""
        trunk, heads = self.parts(params)
        true = jax.tree_util.tree_map(lambda _: True, trunk)
        return self.whole(params, true, [jax.tree_util.tree_map(lambda _: False, h) for h in heads])

    def losses(self, params: PyTree, batch: Any) -> jax.Array:
        """The ``[T]`` task losses ``ℓ_t = L_t(ψ_t, trunk(θ))`` (one trunk forward pass)."""
        trunk, heads = self.parts(params)
        z = self.trunk_fn(trunk, batch)
        return jnp.stack([jnp.asarray(f(h, z, batch)) for f, h in zip(self.head_loss_fns, heads)])


Model = Union[Callable[..., Any], TrunkHeads]


def _check_spec_call(argnums: int, has_aux: bool) -> None:
    if argnums != 0 or has_aux:
        raise ValueError("a TrunkHeads model is called as fn(params, batch): argnums must be 0 and has_aux False.")


def transform_losses(losses: jax.Array, *, log: bool = True, eps: float = 1e-8) -> jax.Array:
    """``log(ℓ + ε)`` (paper Sec. 3.1) or the identity when ``log=False``.

    A loss with ``ℓ + ε ≤ 0`` has no logarithm: its value *and its gradient* are NaN (``jnp.log``'s
    derivative ``1/x`` alone would stay finite, with the wrong sign), so the step is visibly invalid.

    float16 losses warn when this function is differentiated by hand: the pull-back enters the loss's graph
    as ``1/(ℓ + ε)`` in float16, which overflows (max 65504) once a loss falls below about 1.5e-5.  The
    library's gradient functions (:func:`value_and_task_grads`, :func:`dbmtl_jax.fused_dbmtl`,
    :func:`dbmtl_jax.loss_weighting.value_and_weighted_grad`) rescale that cotangent and are exact for float16 losses.
    """
    losses = jnp.asarray(losses)
    eps = _check_eps(eps, "transform_losses")
    if log and jnp.dtype(losses.dtype) == jnp.float16:
        warnings.warn(
            "float16 task losses under the log transform: the gradient of log(ℓ + ε) carries 1/ℓ in float16, "
            "which overflows (inf gradients, rejected steps) once a loss falls below ~1.5e-5; use "
            "value_and_task_grads (it rescales the cotangent) or reduce the losses in float32.",
            stacklevel=2,
        )
    return _transform(losses, log, eps)


def _transform(losses: jax.Array, log: bool, eps: float) -> jax.Array:
    """:func:`transform_losses` without the float16 warning (for the paths that rescale the cotangent)."""
    if not log:
        return losses
    acc = jnp.promote_types(losses.dtype, jnp.float32)
    return _log_or_nan(losses.astype(acc) + eps)


# float16 losses under the log: the cotangent 1/(ℓ_t + ε) that a pull-back carries into the loss's graph
# overflows float16 once ℓ_t < ~1.5e-5.  The gradient paths pull back 1/((ℓ_t + ε) R_t) instead, R_t ≥ 1 a
# power of two that keeps it ≤ _COTANGENT_CAP, and multiply task t's gradient by R_t in float32 afterwards
# (loss scaling, per task).  Other dtypes have float32's range and keep the unscaled, bitwise-unchanged path.
_COTANGENT_CAP = 2.0 ** 10


def _rescales(dtype: Any, log: bool) -> bool:
    """Whether a loss of ``dtype`` needs its cotangent rescaled (float16 under the log)."""
    return bool(log) and jnp.dtype(dtype) == jnp.float16


def _cotangent_scale(cotangent: jax.Array) -> jax.Array:
    """Powers of two ``R ≥ 1`` with ``|cotangent| / R ≤ _COTANGENT_CAP`` (``R = 1`` where not finite), no gradient."""
    a = jnp.abs(jax.lax.stop_gradient(cotangent).astype(jnp.float32))
    big = jnp.isfinite(a) & (a > _COTANGENT_CAP)
    return jnp.where(big, jnp.exp2(jnp.ceil(jnp.log2(jnp.where(big, a, 1.0) / _COTANGENT_CAP))), 1.0)


def _log_scale(losses: jax.Array, eps: float) -> jax.Array:
    """``R_t`` for the log transform's cotangent ``1/(ℓ_t + ε)``."""
    return _cotangent_scale(1.0 / (losses.astype(jnp.float32) + eps))


def _scale_rows(tree: PyTree, scale: jax.Array) -> PyTree:
    """Multiplies row ``t`` of every leaf (``[n, ...]``) by ``scale[t]`` in float32, keeping the leaf dtype
    (a scalar ``scale`` multiplies every leaf, whatever its shape)."""

    def f(g: jax.Array) -> jax.Array:
        acc = jnp.promote_types(g.dtype, jnp.float32)
        s = scale if scale.ndim == 0 else scale.reshape((-1,) + (1,) * (g.ndim - 1))
        return (g.astype(acc) * s.astype(acc)).astype(g.dtype)

    return jax.tree_util.tree_map(f, tree)


def _scaled_fold(fold_fn: Callable[[Any, jax.Array, PyTree], Any], scale: Optional[jax.Array]) -> Callable:
    """``fold_fn`` fed chunks whose rows are multiplied by their ``scale`` entries first (``None``: unchanged)."""
    if scale is None:
        return fold_fn

    def fold(carry: Any, start: jax.Array, grads: PyTree) -> Any:
        n = jax.tree_util.tree_leaves(grads)[0].shape[0]
        return fold_fn(carry, start, _scale_rows(grads, jax.lax.dynamic_slice_in_dim(scale, start, n)))

    return fold


@jax.custom_vjp
def _log_or_nan(x: jax.Array) -> jax.Array:
    """``log(x)``, NaN where ``x ≤ 0``, with gradient ``1/x``, NaN where ``x ≤ 0`` or ``x`` is not finite (an
    overflowed loss: ``1/inf = 0`` would be a finite, all-zero gradient that lets the step through): only in
    the rows of the tasks whose entry is pulled back (a one-hot cotangent of another task stays finite)."""
    return jnp.log(jnp.where(x > 0, x, jnp.nan))


def _log_or_nan_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _log_or_nan(x), x


def _log_or_nan_bwd(x: jax.Array, ct: jax.Array) -> tuple[jax.Array]:
    ok = (x > 0) & jnp.isfinite(x)
    return (jnp.where(ok, ct / jnp.where(ok, x, 1), jnp.where(ct != 0, jnp.nan, 0)).astype(x.dtype),)


_log_or_nan.defvjp(_log_or_nan_fwd, _log_or_nan_bwd)


def _check_losses(losses: Any, what: str) -> jax.Array:
    losses = jnp.asarray(losses)
    if losses.ndim != 1:
        raise ValueError(
            f"{what} must return a 1-D vector of T task losses (the task axis), got shape {losses.shape}."
        )
    if losses.shape[0] == 0:
        raise ValueError(f"{what} returned no task losses (shape (0,)); it must return one loss per task.")
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        raise TypeError(f"{what} must return floating-point losses, got dtype {losses.dtype}.")
    return losses


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (numbers.Number, np.generic)) or (hasattr(x, "shape") and jnp.ndim(x) == 0)


def _split_aux(out: Any, has_aux: bool) -> tuple[Any, Any]:
    """``(losses, aux)`` of ``loss_fn``'s output, with errors that name ``has_aux`` when it looks mixed up."""
    pair = isinstance(out, (tuple, list)) and len(out) == 2
    if has_aux:
        if not pair:
            got = f"{type(out).__name__}" + (f" of shape {jnp.shape(out)}" if hasattr(out, "shape") else "")
            raise ValueError(f"has_aux=True: loss_fn must return a pair (losses, aux), got {got}.")
        return out[0], out[1]
    if pair and not all(_is_scalar(x) for x in out):
        raise ValueError(
            "loss_fn returned a pair that is not two scalar task losses; if it returns (losses, aux), "
            "pass has_aux=True."
        )
    return out, None


def _check_eps(eps: Any, where: str) -> Any:
    """``eps`` of ``log(ℓ_t + ε)`` checked finite and > 0 (a negative one would shift the log silently:
    ∇ log(ℓ − 1) for eps = −1); ``where`` names the function in the error."""
    from dbmtl_jax.methods import _numerics  # here, not at the top, as in task_axis

    return _numerics.check_real(eps, "eps", where, lo=0, lo_open=True, note="the ε of log(ℓ_t + ε)")


def _check_argnums(argnums: Any) -> int:
    if isinstance(argnums, (bool, np.bool_)) or not isinstance(argnums, numbers.Integral):
        raise TypeError(f"argnums must be a single int, got {argnums!r}.")
    return int(argnums)


def _resolve_argnums(argnums: int, args: Sequence[Any]) -> int:
    """``argnums`` as an index into ``args`` (a negative one counts from the end, as in ``jax.grad``)."""
    n = len(args)
    if not -n <= argnums < n:
        need = argnums + 1 if argnums >= 0 else -argnums
        raise ValueError(
            f"argnums={argnums} needs at least {need} positional argument(s), got {n}: pass the parameters "
            "positionally (keyword arguments are not differentiated)."
        )
    return argnums % n


def _check_differentiable(params: PyTree, what: str) -> None:
    """Every leaf of the differentiated argument must be a float (``jax.grad`` refuses the rest too)."""
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = getattr(x, "dtype", None)
        if dtype is None:
            dtype = np.asarray(x).dtype
        if not jnp.issubdtype(dtype, jnp.inexact):
            name = jax.tree_util.keystr(path) or "(the argument itself)"
            raise TypeError(
                f"{what} differentiates every leaf of its argument, but leaf {name} has dtype {dtype} "
                "(jax.grad refuses it too): keep integer state out of the differentiated argument "
                "(e.g. nnx.split(model, nnx.Param, ...)) and pass it as another argument."
            )


def _objective(
    loss_fn: Callable[..., Any], args: list, kwargs: dict, argnums: int, has_aux: bool, log: bool, eps: float
) -> Callable[[PyTree], tuple[jax.Array, tuple]]:
    """``p -> (log(ℓ + ε) / R, (ℓ, aux, R))`` with ``p`` in position ``argnums`` of ``loss_fn``'s arguments.

    ``R`` (``[T]``, see :func:`_log_scale`) is ``None`` unless the losses are float16 under the log; then row
    ``t`` of the pull-back must be multiplied by ``R_t``."""

    def f(p: PyTree) -> tuple[jax.Array, tuple]:
        out = loss_fn(*(args[:argnums] + [p] + args[argnums + 1 :]), **kwargs)
        losses, aux = _split_aux(out, has_aux)
        losses = _check_losses(losses, "loss_fn")
        tl = _transform(losses, log, eps)
        scale = _log_scale(losses, eps) if _rescales(losses.dtype, log) else None
        return (tl if scale is None else tl / scale), (losses, aux, scale)

    return f


def _pullback(vjp_fn: Callable, cotangents: jax.Array, strategy: str, chunk_size: Optional[int]) -> PyTree:
    """Applies ``vjp_fn`` to each row of ``cotangents`` and stacks the results."""
    t = jax.tree_util.tree_leaves(cotangents)[0].shape[0]
    if chunk_size is not None and chunk_size < t:
        return jax.lax.map(vjp_fn, cotangents, batch_size=int(chunk_size))
    if strategy == "loop":
        rows = [vjp_fn(jax.tree_util.tree_map(lambda c, i=i: c[i], cotangents)) for i in range(t)]
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *rows)
    return jax.vmap(vjp_fn)(cotangents)


def _check_strategy(strategy: str, chunk_size: Optional[int]) -> str:
    if strategy == "jacrev":  # jax.jacrev is the vmap of the VJP: it compiled to the same program
        _deprecated('strategy="jacrev"', 'strategy="vmap" (the same program)', stacklevel=4)
        strategy = "vmap"
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}.")
    return strategy


def value_and_task_grads(
    model: Model,
    argnums: int = 0,
    *,
    log: bool = True,
    eps: float = 1e-8,
    has_aux: bool = False,
    strategy: str = "loop",
    chunk_size: Optional[int] = None,
) -> Callable[..., Any]:
    """Transforms a model into a function returning losses and per-task gradients ``∇ log(ℓ_t + ε)``.

    Args:
      model: ``loss_fn(*args) -> [T]`` raw task losses ``ℓ_t`` (or ``(losses,
        aux)`` with ``has_aux=True``), or a :class:`TrunkHeads` spec (each head
        back-propagated once; ``argnums`` 0 and no ``has_aux``).
      argnums: which positional argument of ``loss_fn`` to differentiate (one int).
      log: differentiate ``log(ℓ_t + ε)`` (DB-MTL, Lin et al. Sec. 3.1) rather than ``ℓ_t``.
      eps: the ε inside the log.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      strategy: ``"loop"`` (default: T VJP calls of the one forward pass,
        unrolled in the graph) or ``"vmap"`` (vmap of the VJP).  On CPU
        ``"loop"`` was fastest (MLP, T=3/10/40: 35/154/1237 ms vs 49/249/2461 ms
        for ``"vmap"``; see benchmarks/RESULTS.md): the vmapped pull-back makes
        XLA materialise transposed weight gradients.  ``"loop"`` compiles more
        slowly as T grows.  (``"jacrev"``, deprecated, is ``"vmap"``.)
      chunk_size: pull back at most this many tasks at a time (``lax.map`` with
        ``batch_size``, vmapped within a chunk), bounding the transient
        Jacobian memory to ``chunk_size × P``.  ``None``: all T at once.

    Returns:
      For a ``loss_fn``: a function with its signature returning ``(losses,
      grads)`` or ``((losses, aux), grads)``.  For a :class:`TrunkHeads` spec:
      ``fn(params, batch) -> (losses, grads)``.  ``losses`` are the raw ``ℓ_t``;
      ``grads`` has the structure of the parameters and every leaf the task
      axis ``[T, *param_shape]`` (a head's gradient sits in its own task's row,
      zeros elsewhere), ready for :func:`dbmtl_jax.dbmtl` and the other
      transforms.
    """
    argnums = _check_argnums(argnums)
    chunk_size = None if chunk_size is None else _check_chunk(chunk_size)
    eps = _check_eps(eps, "value_and_task_grads")
    strategy = _check_strategy(strategy, chunk_size)
    if isinstance(model, TrunkHeads):
        _check_spec_call(argnums, has_aux)
        return _trunk_heads_grads(model, log, eps, strategy, chunk_size)
    loss_fn = model

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        i = _resolve_argnums(argnums, args)
        _check_differentiable(args[i], "value_and_task_grads")
        f = _objective(loss_fn, list(args), kwargs, i, has_aux, log, eps)
        tl, vjp_fn, (losses, aux, scale) = jax.vjp(f, args[i], has_aux=True)
        eye = jnp.eye(tl.shape[0], dtype=tl.dtype)
        grads = _pullback(lambda c: vjp_fn(c)[0], eye, strategy, chunk_size)
        grads = grads if scale is None else _scale_rows(grads, scale)
        return ((losses, aux), grads) if has_aux else (losses, grads)

    return wrapped


def _heads_once(
    trunk_fn: Callable, head_loss_fns: Sequence[Callable], trunk_params: PyTree, head_params: Sequence[PyTree],
    batch: Any, log: bool, eps: float,
) -> tuple[jax.Array, tuple, PyTree, Callable, Optional[jax.Array]]:
    """Trunk forward, then each head differentiated once for its own task.

    Returns ``(losses [T], head_grads, feature cotangents stacked [T, ...], trunk_vjp, scale)``.  ``scale``
    is ``None`` unless a head's loss is float16 under the log: then its feature cotangent is divided by
    ``scale[t]`` (:func:`_log_scale`; 1 for the other heads), so the trunk gradient of row ``t`` must be
    multiplied by it (the head gradients come out multiplied already).
    """
    if len(head_params) != len(head_loss_fns):
        raise ValueError(
            f"got {len(head_params)} head parameter sets for {len(head_loss_fns)} head losses; "
            "the task axis must match."
        )
    _check_differentiable((trunk_params, tuple(head_params)), "a TrunkHeads spec")
    features, trunk_vjp = jax.vjp(lambda p: trunk_fn(p, batch), trunk_params)
    for path, z in jax.tree_util.tree_flatten_with_path(features)[0]:
        if not jnp.issubdtype(jnp.result_type(z), jnp.inexact):
            raise TypeError(
                f"trunk_fn must return floating-point features (the heads are differentiated with respect to "
                f"them), but feature {jax.tree_util.keystr(path) or '(the output)'} has dtype {jnp.result_type(z)}: "
                "pass integer data to the heads through batch."
            )
    losses, head_grads, feat_cts, scales = [], [], [], []
    for t, (fn, hp) in enumerate(zip(head_loss_fns, head_params)):
        def head_obj(hp_, z_, fn=fn, t=t):
            loss = jnp.asarray(fn(hp_, z_, batch))
            if loss.ndim != 0:
                raise ValueError(f"head_loss_fns[{t}] must return a scalar loss, got shape {loss.shape}.")
            if not jnp.issubdtype(loss.dtype, jnp.floating):  # an integer loss has zero gradients, silently
                raise TypeError(f"head_loss_fns[{t}] must return a floating-point loss, got dtype {loss.dtype}.")
            tl = _transform(loss[None], log, eps)[0]
            scale = _log_scale(loss, eps) if _rescales(loss.dtype, log) else None
            return (tl if scale is None else tl / scale), (loss, scale)

        (_, (loss, scale)), (g_head, g_feat) = jax.value_and_grad(head_obj, argnums=(0, 1), has_aux=True)(hp, features)
        losses.append(loss)
        head_grads.append(g_head if scale is None else _scale_rows(g_head, scale))
        feat_cts.append(g_feat)
        scales.append(scale)
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *feat_cts)
    scale = None
    if any(s is not None for s in scales):
        scale = jnp.stack([jnp.ones([], jnp.float32) if s is None else s for s in scales])
    return jnp.stack(losses), tuple(head_grads), stacked, trunk_vjp, scale


def _trunk_heads_grads(
    spec: TrunkHeads, log: bool, eps: float, strategy: str, chunk_size: Optional[int]
) -> Callable[[PyTree, Any], tuple[jax.Array, PyTree]]:
    """:func:`value_and_task_grads` of a :class:`TrunkHeads` spec: heads once, the trunk pulled back per task."""
    if not spec.head_loss_fns:
        raise ValueError("head_loss_fns is empty; give one head loss per task.")

    def wrapped(params: PyTree, batch: Any) -> tuple[jax.Array, PyTree]:
        trunk_params, head_params = spec.parts(params)
        losses, trunk_grads, head_grads = _trunk_heads_pull(spec, trunk_params, head_params, batch, log, eps,
                                                            strategy, chunk_size)
        return losses, spec.whole(params, trunk_grads, _heads_to_task_axis(head_grads))

    return wrapped


def _trunk_heads_pull(
    spec: TrunkHeads, trunk_params: PyTree, head_params: Sequence[PyTree], batch: Any, log: bool, eps: float,
    strategy: str, chunk_size: Optional[int],
) -> tuple[jax.Array, PyTree, tuple]:
    """``(losses, trunk grads [T, ...], plain head grads)``: heads once, then the T feature cotangents pulled back."""
    losses, head_grads, stacked, trunk_vjp, scale = _heads_once(
        spec.trunk_fn, spec.head_loss_fns, trunk_params, head_params, batch, log, eps
    )
    trunk_grads = _pullback(lambda c: trunk_vjp(c)[0], stacked, strategy, chunk_size)
    return losses, (trunk_grads if scale is None else _scale_rows(trunk_grads, scale)), head_grads


def _heads_to_task_axis(head_grads: Sequence[PyTree]) -> tuple[PyTree, ...]:
    """Puts head ``t``'s gradient in row ``t`` of a ``[T, *shape]`` array, zeros elsewhere.

    This gives head gradients the task axis that the transforms expect; the
    transforms sum head leaves over tasks, which recovers each head's gradient.
    """
    num_tasks = len(head_grads)

    def place(t: int, g: jax.Array) -> jax.Array:
        return jnp.zeros((num_tasks,) + g.shape, g.dtype).at[t].set(g)

    return tuple(jax.tree_util.tree_map(lambda g, t=t: place(t, g), hg) for t, hg in enumerate(head_grads))


def trunk_heads_task_grads(
    trunk_fn: Callable[[PyTree, Any], Any],
    head_loss_fns: Sequence[Callable[[PyTree, Any, Any], jax.Array]],
    *,
    log: bool = True,
    eps: float = 1e-8,
    strategy: str = "loop",
    chunk_size: Optional[int] = None,
) -> Callable[[PyTree, Sequence[PyTree], Any], tuple[jax.Array, tuple[PyTree, tuple]]]:
    """Deprecated: use ``value_and_task_grads(TrunkHeads(trunk_fn, head_loss_fns))``.

    Returns ``(trunk_params, head_params, batch) -> (losses, (trunk_grads,
    head_grads))`` with ``head_grads[t]`` the plain gradient of head ``t`` (no task axis).
    """
    _deprecated("dbmtl_jax.trunk_heads_task_grads", "dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, "
                "head_loss_fns)), called as fn((trunk_params, head_params), batch)")
    strategy = _check_strategy(strategy, chunk_size)
    if not head_loss_fns:
        raise ValueError("head_loss_fns is empty; give one head loss per task.")

    spec = TrunkHeads(trunk_fn, head_loss_fns)

    def wrapped(trunk_params: PyTree, head_params: Sequence[PyTree], batch: Any) -> Any:
        losses, trunk_grads, head_grads = _trunk_heads_pull(spec, trunk_params, head_params, batch, log, eps,
                                                            strategy, chunk_size)
        return losses, (trunk_grads, head_grads)

    return wrapped


def heads_to_task_axis(head_grads: Sequence[PyTree]) -> tuple[PyTree, ...]:
    """Deprecated: :func:`value_and_task_grads` of a :class:`TrunkHeads` spec returns head gradients with the task axis."""
    _deprecated("dbmtl_jax.heads_to_task_axis", "dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(...)), whose "
                "head gradients have the task axis")
    return _heads_to_task_axis(head_grads)


def _fold_chunks(
    vjp_fn: Callable,
    cotangents: PyTree,
    fold_fn: Callable[[Any, jax.Array, PyTree], Any],
    carry: Any,
    chunk_size: int,
    unroll: Optional[bool] = None,
) -> Any:
    """Feeds ``vjp_fn`` of consecutive row chunks of ``cotangents`` (leaves ``[T, ...]``) to ``fold_fn``.

    Full chunks run in a ``lax.fori_loop`` (one compiled body whatever T;
    ``unroll=True`` unrolls it); a last, smaller chunk (when ``chunk_size``
    does not divide T) runs after it.
    """
    t = jax.tree_util.tree_leaves(cotangents)[0].shape[0]
    c = min(chunk_size, t)
    n_full, rem = divmod(t, c)
    if unroll is None and n_full > 1:
        unroll = jax.default_backend() == "cpu" and _has_conv(vjp_fn, jax.tree_util.tree_map(lambda x: x[0], cotangents))

    def pull(rows: PyTree, size: int) -> PyTree:
        # One VJP call per task, unrolled inside the chunk: a vmapped pull-back makes
        # XLA transpose every batched weight gradient (measured slower on CPU).
        outs = [vjp_fn(jax.tree_util.tree_map(lambda r, i=i: r[i], rows)) for i in range(size)]
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)

    def body(i: jax.Array, carry: Any) -> Any:
        start = (i * c).astype(jnp.int32)
        rows = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, c, axis=0), cotangents)
        return fold_fn(carry, start, pull(rows, c))

    if n_full == 1:
        carry = body(jnp.zeros([], jnp.int32), carry)
    elif unroll:
        for i in range(n_full):
            carry = body(jnp.asarray(i, jnp.int32), carry)
    else:
        carry = jax.lax.fori_loop(0, n_full, body, carry)
    if rem:
        start = n_full * c
        rows = jax.tree_util.tree_map(lambda x: x[start:], cotangents)
        carry = fold_fn(carry, jnp.asarray(start, jnp.int32), pull(rows, rem))
    return carry


_CONV_PRIMITIVES = ("conv_general_dilated",)


def _jaxpr_has(jaxpr: Any, names: tuple) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            return True
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and _jaxpr_has(inner, names):
                    return True
    return False


def _has_conv(fn: Callable, *args: Any) -> bool:
    """Whether ``fn(*args)`` traces to a convolution (abstract trace only, nothing runs)."""
    return _jaxpr_has(jax.make_jaxpr(fn)(*args).jaxpr, _CONV_PRIMITIVES)


def _check_chunk(chunk_size: Any) -> int:
    """A positive int (a NumPy integer is converted; a bool is refused)."""
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    return int(chunk_size)


def _fold_task_grads(
    loss_fn: Callable[..., Any],
    fold_fn: Callable[[Any, jax.Array, PyTree], Any],
    argnums: int = 0,
    *,
    log: bool = True,
    eps: float = 1e-8,
    has_aux: bool = False,
    chunk_size: int = 1,
    unroll: Optional[bool] = None,
) -> Callable[..., Any]:
    """Like :func:`value_and_task_grads` of a ``loss_fn``, but streams the gradients into ``fold_fn``.

    One forward pass, then the T one-hot cotangents are pulled back
    ``chunk_size`` at a time inside a ``lax.fori_loop``; each chunk's gradients
    go straight to ``carry = fold_fn(carry, start, grads)``, where every leaf of
    ``grads`` has shape ``[c, *param_shape]`` (rows ``start … start+c−1``;
    ``start`` is a traced int32 and ``c`` is ``chunk_size`` except for a smaller
    last chunk when ``chunk_size`` does not divide T).  Nothing of size
    ``T × P`` is allocated unless ``fold_fn`` keeps it, e.g. a
    ``lax.dynamic_update_slice`` into a donated EMA buffer.

    ``unroll=True`` replaces the ``fori_loop`` by a Python loop (T/chunk_size
    copies of the body in the program): XLA's CPU backend compiles
    convolutions inside a while-loop body to a much slower kernel (measured
    8× on the conv benchmark of ``benchmarks/``).  ``unroll=None`` (default)
    unrolls exactly when the backend is the CPU and the pull-back contains a
    convolution; otherwise the ``fori_loop`` keeps one compiled body and the
    lowest memory.

    Returns ``f(carry, *args, **kwargs) -> (losses, carry)`` (``((losses, aux),
    carry)`` with ``has_aux``), where ``args`` are ``loss_fn``'s arguments.
    ``carry`` may also be a function ``carry(losses) -> carry``: it is called
    with the raw losses after the forward pass and before the first fold (for
    a fold that depends on the losses, e.g. one that must not write when they
    are invalid).
    """
    argnums = _check_argnums(argnums)
    chunk_size = _check_chunk(chunk_size)

    def wrapped(carry: Any, *args: Any, **kwargs: Any) -> Any:
        i = _resolve_argnums(argnums, args)
        _check_differentiable(args[i], "fused_dbmtl")
        f = _objective(loss_fn, list(args), kwargs, i, has_aux, log, eps)
        tl, vjp_fn, (losses, aux, scale) = jax.vjp(f, args[i], has_aux=True)
        eye = jnp.eye(tl.shape[0], dtype=tl.dtype)
        carry = carry(losses) if callable(carry) else carry
        carry = _fold_chunks(lambda c: vjp_fn(c)[0], eye, _scaled_fold(fold_fn, scale), carry, chunk_size, unroll)
        return ((losses, aux), carry) if has_aux else (losses, carry)

    return wrapped


def _trunk_heads_fold_task_grads(
    trunk_fn: Callable[[PyTree, Any], Any],
    head_loss_fns: Sequence[Callable[[PyTree, Any, Any], jax.Array]],
    fold_fn: Callable[[Any, jax.Array, PyTree], Any],
    *,
    log: bool = True,
    eps: float = 1e-8,
    chunk_size: int = 1,
    unroll: Optional[bool] = None,
) -> Callable[[Any, PyTree, Sequence[PyTree], Any], tuple[jax.Array, tuple, Any]]:
    """:func:`value_and_task_grads` of a :class:`TrunkHeads` spec, the trunk gradients streamed into ``fold_fn``.

    Each head is differentiated once;
    the T feature cotangents are then pulled back through the trunk
    ``chunk_size`` at a time and each chunk of trunk gradients (leaves
    ``[c, *shape]``, rows ``start …``) goes to ``carry = fold_fn(carry, start,
    grads)``.  ``unroll`` and a callable ``carry`` as in :func:`_fold_task_grads`.

    Returns ``f(carry, trunk_params, head_params, batch) -> (losses,
    head_grads, carry)`` with ``head_grads[t]`` the plain gradient of head ``t``.
    """
    chunk_size = _check_chunk(chunk_size)
    if not head_loss_fns:
        raise ValueError("head_loss_fns is empty; give one head loss per task.")

    def wrapped(carry: Any, trunk_params: PyTree, head_params: Sequence[PyTree], batch: Any) -> Any:
        losses, head_grads, stacked, trunk_vjp, scale = _heads_once(
            trunk_fn, head_loss_fns, trunk_params, head_params, batch, log, eps
        )
        carry = carry(losses) if callable(carry) else carry
        carry = _fold_chunks(lambda c: trunk_vjp(c)[0], stacked, _scaled_fold(fold_fn, scale), carry, chunk_size,
                             unroll)
        return losses, head_grads, carry

    return wrapped


def fold_task_grads(*args: Any, **kwargs: Any) -> Callable[..., Any]:
    """Deprecated (private from 0.3.0): the streamed gradients of :func:`dbmtl_jax.fused_dbmtl`."""
    _deprecated("dbmtl_jax.fold_task_grads", "dbmtl_jax.fused_dbmtl (or dbmtl_jax.value_and_task_grads)")
    return _fold_task_grads(*args, **kwargs)


def trunk_heads_fold_task_grads(*args: Any, **kwargs: Any) -> Callable[..., Any]:
    """Deprecated (private from 0.3.0): the streamed gradients of :func:`dbmtl_jax.fused_dbmtl` on a spec."""
    _deprecated("dbmtl_jax.trunk_heads_fold_task_grads",
                "dbmtl_jax.fused_dbmtl(dbmtl_jax.TrunkHeads(...)) (or dbmtl_jax.value_and_task_grads)")
    return _trunk_heads_fold_task_grads(*args, **kwargs)

"""Audit 32: the state a method is given is the state it was built for.

A restored checkpoint of another run (another ``num_tasks``, another EMA dtype) is an error that names
the state field, not a raw JAX error nor a silent broadcast; ``init`` gives one buffer per state leaf
(donation); a gradient without the task axis is reported as such; ``optax.masked`` over a Flax NNX state
works with every method.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dbmtl_jax

T = 3
PARAMS = {"trunk": jnp.ones((4, 5)), "head": jnp.ones((5,))}


def _grads(t: int, seed: int = 0) -> dict:
    return jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed), (t,) + p.shape), PARAMS)


def _buffer_aliases(tree) -> list:
    """Pairs of state paths that share one device buffer."""
    seen, out = {}, []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        ptr = x.unsafe_buffer_pointer()
        if ptr in seen:
            out.append((jax.tree_util.keystr(seen[ptr]), jax.tree_util.keystr(path)))
        seen[ptr] = path
    return out


# -- C4: one buffer per state leaf -----------------------------------------------------------------


@pytest.mark.parametrize("method", dbmtl_jax.METHODS)
def test_init_gives_every_state_leaf_its_own_buffer(method):
    """No method's init puts one array in two state fields (CAGrad's weights and dual_weights did)."""
    assert _buffer_aliases(dbmtl_jax.get_method(method, T).init(PARAMS)) == []


@pytest.mark.parametrize("wrap", ["skip", "multisteps"])
def test_cagrad_state_can_be_donated_under_the_wrappers(wrap):
    """A jitted step that donates the whole state (the README's pattern) runs for CAGrad under
    skip_invalid_steps and TaskMultiSteps (it failed: 'Attempt to donate the same buffer twice')."""
    base = optax.chain(dbmtl_jax.get_method("cagrad", T), optax.adam(1e-3))
    tx = dbmtl_jax.skip_invalid_steps(base) if wrap == "skip" else dbmtl_jax.TaskMultiSteps(base, T, 2)
    step = jax.jit(lambda g, s: tx.update(g, s, PARAMS), donate_argnums=(1,))
    state = tx.init(PARAMS)
    for i in range(3):
        u, state = step(_grads(T, i), state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    assert int(dbmtl_jax.get_method("cagrad", T).init(PARAMS).count) == 0


# -- C6: a gradient without the task axis is reported as such ---------------------------------------


@pytest.mark.parametrize("method", ["dbmtl", "pcgrad", "uw"])
def test_a_gradient_without_the_task_axis_is_named_so(method):
    """A plain gradient (parameter-shaped leaves) whose first dimension is not T: the error says the task
    axis is missing, not 'a leading task axis of size 4'."""
    params = {"w": jnp.zeros((4, 5)), "b": jnp.zeros((4,))}
    tx = dbmtl_jax.get_method(method, T)
    plain = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match=r"leaf '\w' has shape \(4,?\d*\), its parameter's shape; expected "
                       r"\[num_tasks, \*param_shape\] = \(3, 4.*lacks the leading task axis.*TaskMultiSteps"):
        tx.update(plain, tx.init(params), params, losses=jnp.ones(T), key=jax.random.key(0))


def test_optax_multisteps_around_the_chain_is_named_in_the_error():
    """optax.MultiSteps' parameter-shaped accumulator drops the task axis of correct [T, ...] gradients:
    the error points to TaskMultiSteps."""
    params = {"w": jnp.zeros((4, 5)), "b": jnp.zeros((4,))}
    tx = optax.MultiSteps(optax.chain(dbmtl_jax.dbmtl(T), optax.adam(1e-3)), 2)
    g = jax.tree.map(lambda p: jnp.ones((T,) + p.shape), params)
    with pytest.raises(ValueError, match="lacks the leading task axis.*optax.MultiSteps.*dbmtl_jax.TaskMultiSteps"):
        tx.update(g, tx.init(params), params)


def test_a_scalar_parameter_without_the_task_axis_is_named_so():
    params = {"s": jnp.zeros(()), "w": jnp.zeros((3,))}
    tx = dbmtl_jax.dbmtl(T)
    with pytest.raises(ValueError, match=r"leaf 's' has shape \(\), its parameter's shape.*lacks the leading"):
        tx.update({"s": jnp.ones(()), "w": jnp.ones((T, 3))}, tx.init(params), params)


# -- C7: optax.masked / optax.partition over a Flax NNX state ---------------------------------------


def _nnx_hps():
    nnx = pytest.importorskip("flax.nnx")

    class HPS(nnx.Module):
        def __init__(self, rngs):
            self.trunk = nnx.Linear(4, 8, rngs=rngs)
            self.heads = nnx.List([nnx.Linear(8, 1, rngs=rngs) for _ in range(T)])

        def __call__(self, x):
            z = jax.nn.relu(self.trunk(x))
            return jnp.concatenate([h(z) for h in self.heads], axis=-1)

    return nnx, HPS(nnx.Rngs(0))


def _is_head(path) -> bool:
    return "heads" in jax.tree_util.keystr(path)


@pytest.mark.parametrize("method", dbmtl_jax.METHODS)
def test_masked_method_inits_over_an_nnx_state(method):
    """optax.masked over nnx.state(model, nnx.Param) puts MaskedNode() inside the masked Variables: every
    method's init skips them (dbmtl failed: 'Cannot determine dtype of MaskedNode()')."""
    nnx, model = _nnx_hps()
    state = nnx.state(model, nnx.Param)
    mask = jax.tree_util.tree_map_with_path(lambda p, _: not _is_head(p), state)
    inner = optax.masked(dbmtl_jax.get_method(method, T), mask).init(state).inner_state
    if method == "dbmtl":
        assert inner.ema["trunk"]["kernel"].shape == (T, 4, 8)
        assert jax.tree.leaves(inner.ema["heads"]) == []


@pytest.mark.parametrize("wrap", ["partition", "masked"])
def test_partition_or_masked_dbmtl_in_nnx_optimizer_trains_like_a_shared_mask(wrap):
    """nnx.Optimizer(model, chain(partition({db: dbmtl, sum: Σ_t}), adam)) (README: optax.partition works)
    inits and trains, and gives the parameters of dbmtl(shared=trunk) on plain pytrees, to float rounding."""
    nnx, model = _nnx_hps()
    x = jax.random.normal(jax.random.key(1), (16, 4))
    y = jax.random.normal(jax.random.key(2), (16, T)) * jnp.array([1.0, 10.0, 0.1])

    def losses_of(m):
        return jnp.mean((m(x) - y) ** 2, axis=0)

    def labels(tree):  # a callable: the same labels for init (Variables) and update (pure arrays)
        return jax.tree_util.tree_map_with_path(lambda p, _: "sum" if _is_head(p) else "db", tree)

    sum_tasks = optax.stateless(lambda u, p: jax.tree.map(lambda g: jnp.sum(g, 0), u))
    if wrap == "partition":
        multi = optax.partition({"db": dbmtl_jax.dbmtl(T), "sum": sum_tasks}, labels)
    else:
        multi = optax.chain(
            optax.masked(dbmtl_jax.dbmtl(T), lambda t: jax.tree.map(lambda l: l == "db", labels(t))),
            optax.masked(sum_tasks, lambda t: jax.tree.map(lambda l: l == "sum", labels(t))),
        )
    opt = nnx.Optimizer(model, optax.chain(multi, optax.adam(1e-2)), wrt=nnx.Param)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.as_pure(params)
    ref_tx = optax.chain(dbmtl_jax.dbmtl(T, shared=lambda p: p.startswith("trunk")), optax.adam(1e-2))
    ref_state = ref_tx.init(params)

    @nnx.jit
    def step(model, opt):
        gd, p, r = nnx.split(model, nnx.Param, ...)
        _, g = dbmtl_jax.value_and_task_grads(lambda q: losses_of(nnx.merge(gd, q, r)))(p)
        opt.update(model, g)

    for _ in range(4):
        step(model, opt)
        _, g = dbmtl_jax.value_and_task_grads(lambda q: losses_of(nnx.merge(graphdef, q, rest)))(params)
        u, ref_state = ref_tx.update(g, ref_state, params)
        params = optax.apply_updates(params, u)
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# -- S8 / C1: a state of another num_tasks is an error naming the field ------------------------------


def _kwargs(method: str) -> dict:
    return {"warmup_epochs": 0} if method == "stch" else {}


def _restored(method: str, t_from: int, t_to: int, steps: int = 0):
    """A t_from-task state (after ``steps`` updates) restored by flax.serialization (which checks no shapes)
    onto the state of a t_to-task transform."""
    serialization = pytest.importorskip("flax.serialization")
    a = dbmtl_jax.get_method(method, t_from, **_kwargs(method))
    b = dbmtl_jax.get_method(method, t_to, **_kwargs(method))
    s = a.init(PARAMS)
    for i in range(steps):
        _, s = a.update(_grads(t_from, i), s, PARAMS, losses=jnp.full([t_from], 2.0), key=jax.random.key(i))
    return b, serialization.from_bytes(b.init(PARAMS), serialization.to_bytes(s))


def _trace_update(tx, state, params=PARAMS):
    """Traces one update (the checks run at trace time) without compiling or running it."""
    return jax.eval_shape(
        lambda g, s: tx.update(g, s, params, losses=jnp.array([1.0, 2.0, 3.0]), key=jax.random.key(0)), _grads(T), state
    )


# graddrop's state (a count and a fraction) does not depend on num_tasks: it is valid for any T.
_PER_TASK = [m for m in dbmtl_jax.METHODS if m != "graddrop"]


@pytest.mark.parametrize("t_from", [1, 2])
@pytest.mark.parametrize("method", _PER_TASK)
def test_a_state_of_another_num_tasks_is_an_error_naming_the_field(method, t_from):
    """A T=1 or T=2 checkpoint restored into a T=3 transform raises a ValueError naming the state field (a T=1
    FAMO/STCH/IMTL state broadcast silently over the 3 tasks; 13 methods failed with raw JAX errors)."""
    tx, restored = _restored(method, t_from, T)
    with pytest.raises(ValueError, match=rf"state.* has shape \(([0-9]+, )?{t_from}[,)]"):
        _trace_update(tx, restored)


@pytest.mark.parametrize("method", ["famo", "stch", "imtl", "uw", "nash_mtl", "fairgrad"])
def test_the_state_error_names_num_tasks_and_hints_at_a_checkpoint(method):
    tx, restored = _restored(method, 1, T, steps=1)
    with pytest.raises(ValueError, match=rf"{method}: state field .* has shape \(1,?.*\) but this {method} "
                                         rf"\(num_tasks=3\) expects \(3,?.*a checkpoint of another run"):
        tx.update(_grads(T), restored, PARAMS, losses=jnp.array([1.0, 2.0, 3.0]), key=jax.random.key(0))


@pytest.mark.parametrize("method", ["uw", "famo", "stch"])
def test_a_state_of_another_num_tasks_is_rejected_in_the_weighted_mode_too(method):
    serialization = pytest.importorskip("flax.serialization")
    kw = dict(_kwargs(method), grads="weighted")
    a, b = dbmtl_jax.get_method(method, 1, **kw), dbmtl_jax.get_method(method, T, **kw)
    restored = serialization.from_bytes(b.init(PARAMS), serialization.to_bytes(a.init(PARAMS)))
    plain = jax.tree.map(jnp.ones_like, PARAMS)
    with pytest.raises(ValueError, match="state field .* has shape \\(1,\\)"):
        b.update(plain, restored, PARAMS, losses=jnp.array([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("method", ["pcgrad", "gradvac", "dbmtl", "moco"])
def test_the_state_check_works_without_params(method):
    """params=None: the check runs on parameter shapes taken from the update leaves."""
    tx, restored = _restored(method, 2, T)
    with pytest.raises(ValueError, match=r"has shape \((1, )?2"):
        _trace_update(tx, restored, params=None)


def test_a_state_of_another_method_is_an_error():
    state = dbmtl_jax.get_method("famo", T).init(PARAMS)
    with pytest.raises(ValueError, match=r"uw: the state has \d+ array leaves but this uw \(num_tasks=3\) keeps \d+"):
        dbmtl_jax.get_method("uw", T).update(_grads(T), state, PARAMS, losses=jnp.ones(T))


@pytest.mark.parametrize("method", dbmtl_jax.METHODS)
@pytest.mark.parametrize("params", ["given", "none"])
def test_the_check_accepts_the_state_init_gives_and_a_restored_one(method, params):
    """What init gives, and a state restored with the right shapes (NumPy leaves), pass the check."""
    tx, restored = _restored(method, T, T)
    p = PARAMS if params == "given" else None
    for state in (tx.init(PARAMS), restored):
        _, new = _trace_update(tx, state, params=p)
        assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, tx.init(PARAMS))


@pytest.mark.parametrize("method", ["famo", "stch", "imtl", "pcgrad", "dbmtl"])
def test_a_matching_restored_state_gives_the_original_next_update(method):
    tx, restored = _restored(method, T, T, steps=2)
    s = tx.init(PARAMS)
    for i in range(2):
        _, s = tx.update(_grads(T, i), s, PARAMS, losses=jnp.full([T], 2.0), key=jax.random.key(i))
    step = jax.jit(lambda g, s: tx.update(g, s, PARAMS, losses=jnp.array([1.0, 2.0, 3.0]), key=jax.random.key(5)))
    for a, b in zip(jax.tree.leaves(step(_grads(T, 5), s)), jax.tree.leaves(step(_grads(T, 5), restored))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- S7: a DB-MTL EMA of another dtype ------------------------------------------------------------


def _ema_case():
    params = {"w": jnp.ones((4,))}
    g = {"w": jnp.array([[1.0, 2.0, 3.0, 4.0]] * T) * jnp.array([[1.0], [1.001], [1.002]])}
    return params, g


def _bf16_state_into(target_state):
    """A bfloat16-EMA dbmtl state after one step, restored onto ``target_state`` (flax.serialization)."""
    serialization = pytest.importorskip("flax.serialization")
    params, g = _ema_case()
    old = optax.chain(dbmtl_jax.dbmtl(T, ema_dtype=jnp.bfloat16), optax.sgd(0.1))
    _, s = old.update(g, old.init(params), params)
    return serialization.from_bytes(target_state, serialization.to_bytes(s))


@pytest.mark.parametrize("params_given", [True, False])
def test_a_bfloat16_ema_restored_into_a_float32_dbmtl_is_an_error(params_given):
    """The restored bf16 EMA kept training in bf16 (rounding merged the tasks' rows), silently."""
    params, g = _ema_case()
    new = optax.chain(dbmtl_jax.dbmtl(T), optax.sgd(0.1))
    restored = _bf16_state_into(new.init(params))
    assert restored[0].ema["w"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"DB-MTL state \(ema\) of leaf 'w' has dtype bfloat16 but this transform "
                                         r"keeps it in float32 \(ema_dtype=None.*a checkpoint of another run"):
        jax.jit(new.update)(g, restored, params if params_given else None)


def test_a_bfloat16_ema_restored_into_the_fused_step_is_an_error():
    params, _ = _ema_case()
    fused = dbmtl_jax.fused_dbmtl(lambda p: jnp.stack([jnp.sum(p["w"] ** 2) + t for t in range(1, T + 1)]), T,
                                  optax.sgd(0.1))
    restored = _bf16_state_into(fused.init(params))
    with pytest.raises(ValueError, match=r"fused DB-MTL state \(ema\) of leaf 'w' has dtype bfloat16 .* float32"):
        jax.jit(fused.update)(restored, params)


def test_a_float32_ema_given_to_a_bfloat16_ema_dbmtl_is_an_error():
    params, g = _ema_case()
    tx = dbmtl_jax.dbmtl(T, ema_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"has dtype float32 but this transform keeps it in bfloat16 "
                                         r"\(ema_dtype=bfloat16\)"):
        tx.update(g, dbmtl_jax.dbmtl(T).init(params), params)


@pytest.mark.parametrize("fused", [False, True])
def test_consistent_ema_dtypes_still_run(fused):
    """ema_dtype=bfloat16 built and used consistently, and bf16 parameters with their default float32 EMA."""
    params32, g32 = _ema_case()
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params32)
    g16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), g32)
    cases = [(params32, g32, {"ema_dtype": jnp.bfloat16}, jnp.bfloat16), (params16, g16, {}, jnp.float32),
             (params16, g16, {"ema_dtype": "float32"}, jnp.float32)]
    for params, g, kw, want in cases:
        if fused:
            tx = dbmtl_jax.fused_dbmtl(
                lambda p: jnp.stack([jnp.sum(p["w"].astype(jnp.float32) ** 2) + t for t in range(1, T + 1)]), T,
                optax.sgd(0.1), **kw)
            state = tx.init(params)
            for _ in range(2):
                _, _, state = jax.jit(tx.update)(state, params)
            ema = state[0].ema["w"]
        else:
            tx = dbmtl_jax.dbmtl(T, **kw)
            state = tx.init(params)
            for p in (params, None, params):
                u, state = jax.jit(tx.update)(g, state, p)
            assert u["w"].dtype == params["w"].dtype and bool(jnp.all(jnp.isfinite(u["w"])))
            ema = state.ema["w"]
        assert ema.dtype == want and int((state[0] if fused else state).count) > 0


@pytest.mark.parametrize("name", ["igbv2", "dbmtl"])
def test_an_eager_update_accepts_a_state_restored_as_numpy_arrays(name):
    """A checkpoint restored with ``flax.serialization.from_bytes`` or ``jax.device_get`` holds NumPy arrays:
    the eager ``update`` continues from it exactly as from the device state (IGBv2 raised AttributeError: no
    ``.at`` on a NumPy array)."""
    params = {"w": jnp.zeros(4)}
    g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)}
    tx = dbmtl_jax.get_method(name, 3)
    kw = dict(losses=jnp.array([1.0, 2.0, 3.0]), key=jax.random.key(0))
    _, state = tx.update(g, tx.init(params), params, **kw)
    host = jax.tree.map(lambda x: np.asarray(x) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
                        jax.device_get(state))
    u_dev, s_dev = tx.update(g, state, params, **kw)
    u_host, s_host = tx.update(g, host, params, **kw)
    for a, b in zip(jax.tree.leaves((u_dev, s_dev)), jax.tree.leaves((u_host, s_host))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

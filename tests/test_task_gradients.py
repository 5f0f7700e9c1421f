"""Per-task gradient helpers: strategies agree with independent per-task jax.grad calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dbmtl_jax
from dbmtl_jax.task_gradients import STRATEGIES, _fold_task_grads

T = 3


def _problem(seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (32, 5))
    ys = [jax.random.normal(k[1], (32, 2)) * s for s in (1.0, 30.0, 0.01)]
    trunk = {"w": jax.random.normal(k[2], (5, 7)) * 0.5, "b": jnp.zeros(7)}
    heads = tuple({"w": jax.random.normal(kk, (7, 2)) * 0.5} for kk in jax.random.split(k[3], T))

    def trunk_fn(p, batch):
        return jnp.tanh(batch @ p["w"] + p["b"])

    def head_loss(t):
        def f(hp, z, batch):
            del batch
            return jnp.mean((z @ hp["w"] - ys[t]) ** 2)

        return f

    head_fns = [head_loss(t) for t in range(T)]

    def losses(params):
        z = trunk_fn(params["trunk"], x)
        return jnp.stack([head_fns[t](params["heads"][t], z, x) for t in range(T)])

    return {"trunk": trunk, "heads": heads}, losses, trunk_fn, head_fns, x


def _reference(params, losses, log=True):
    out = []
    for t in range(T):
        f = (lambda p, t=t: jnp.log(losses(p)[t] + 1e-8)) if log else (lambda p, t=t: losses(p)[t])
        out.append(jax.grad(f)(params))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *out)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("log", [True, False])
def test_strategies_match_separate_grads(strategy, log):
    params, losses, *_ = _problem()
    want = _reference(params, losses, log)
    got_l, got = jax.jit(dbmtl_jax.value_and_task_grads(losses, log=log, strategy=strategy))(params)
    np.testing.assert_allclose(got_l, losses(params), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_chunked_matches_unchunked(chunk):
    params, losses, *_ = _problem(1)
    _, a = dbmtl_jax.value_and_task_grads(losses)(params)
    _, b = jax.jit(dbmtl_jax.value_and_task_grads(losses, chunk_size=chunk))(params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_has_aux_and_argnums():
    params, losses, *_ = _problem(2)

    def f(scale, p):
        l = losses(p) * scale
        return l, {"sum": jnp.sum(l)}

    (l, aux), g = dbmtl_jax.value_and_task_grads(f, argnums=1, has_aux=True)(2.0, params)
    np.testing.assert_allclose(aux["sum"], jnp.sum(l), rtol=1e-6)
    want = _reference(params, lambda p: losses(p) * 2.0)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_trunk_heads_matches_full(strategy):
    params, losses, trunk_fn, head_fns, x = _problem(3)
    want = _reference(params, losses)
    fn = jax.jit(dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, head_fns), strategy=strategy))
    l, (g_trunk, g_heads) = fn((params["trunk"], params["heads"]), x)
    np.testing.assert_allclose(l, losses(params), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_trunk), jax.tree.leaves(want["trunk"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert isinstance(g_heads, tuple)  # the heads' container, each head's gradient in its own task's row
    for a, b in zip(jax.tree.leaves(g_heads), jax.tree.leaves(want["heads"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 2])
def test_trunk_heads_spec_layouts_agree_bit_for_bit(chunk):
    """A spec with split/join over {"trunk", "heads"} params gives the (trunk, heads) layout's numbers, and the
    spec's losses are those of the loss_fn."""
    params, losses, trunk_fn, head_fns, x = _problem(5)
    pair = dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, head_fns), chunk_size=chunk)
    spec = dbmtl_jax.TrunkHeads(trunk_fn, head_fns, split=lambda p: (p["trunk"], p["heads"]),
                                join=lambda tr, hs: {"trunk": tr, "heads": tuple(hs)})
    dct = dbmtl_jax.value_and_task_grads(spec, chunk_size=chunk)
    l1, (gt, gh) = jax.jit(pair)((params["trunk"], params["heads"]), x)
    l2, g = jax.jit(dct)(params, x)
    np.testing.assert_array_equal(l1, l2)
    assert jax.tree.structure(g) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves((gt, gh)), jax.tree.leaves((g["trunk"], g["heads"]))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(spec.losses(params, x), losses(params), rtol=1e-6)
    assert spec.shared_mask(params) == {"trunk": {"b": True, "w": True}, "heads": ({"w": False},) * T}
    assert spec.num_tasks == T


def test_trunk_heads_runs_each_head_backward_once():
    """With T heads, the head part of the jaxpr holds T head backward passes, not T×T."""
    params, losses, trunk_fn, head_fns, x = _problem(4)
    fn = dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, head_fns))
    jaxpr = jax.make_jaxpr(fn)((params["trunk"], params["heads"]), x)
    # forward z@w (T) + backward: d/dw and d/dz per head (2T) -> 3T dots on [32,7]x[7,2]-shaped operands
    head_dots = [
        e for e in jaxpr.eqns if e.primitive.name == "dot_general" and any(v.aval.shape in [(7, 2)] for v in e.invars)
    ]
    assert len(head_dots) == 2 * T, len(head_dots)


def test_errors():
    params, losses, trunk_fn, head_fns, x = _problem()
    with pytest.raises(ValueError, match="1-D vector"):
        dbmtl_jax.value_and_task_grads(lambda p: jnp.sum(losses(p)))(params)
    with pytest.raises(ValueError, match="1-D vector"):
        dbmtl_jax.value_and_task_grads(lambda p: losses(p)[None])(params)
    with pytest.raises(ValueError, match="unknown strategy"):
        dbmtl_jax.value_and_task_grads(losses, strategy="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        dbmtl_jax.value_and_task_grads(losses, chunk_size=0)
    for eps in (-1.0, 0.0, float("inf"), float("nan")):  # eps = -1 silently gave ∇ log(ℓ − 1)
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            dbmtl_jax.value_and_task_grads(losses, eps=eps)
    for eps in ("1e-8", True):
        with pytest.raises(TypeError, match="eps must be"):
            dbmtl_jax.value_and_task_grads(losses, eps=eps)
    spec = dbmtl_jax.TrunkHeads(trunk_fn, head_fns)
    with pytest.raises(ValueError, match="trunk_params, head_params"):
        dbmtl_jax.value_and_task_grads(spec)((params["trunk"], params["heads"][:2]), x)
    with pytest.raises(ValueError, match="head parameter sets"):
        dbmtl_jax.value_and_task_grads(spec._replace(split=lambda p: p, join=lambda t, h: (t, h)))(
            (params["trunk"], params["heads"][:2]), x)
    with pytest.raises(TypeError, match="floating-point loss"):  # was all-zero gradients for that task
        dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, [lambda hp, z, b: jnp.sum(z).astype(int)] * T))(
            (params["trunk"], params["heads"]), x
        )
    with pytest.raises(ValueError, match="scalar loss"):
        dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, [lambda hp, z, b: z @ hp["w"]] * T))(
            (params["trunk"], params["heads"]), x
        )
    with pytest.raises(ValueError, match="argnums must be 0"):
        dbmtl_jax.value_and_task_grads(spec, has_aux=True)
    with pytest.raises(ValueError, match="empty"):
        dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, []))


def _conv_problem(T=3):
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    w = jax.random.normal(k[0], (3, 3, 2, 4)) * 0.3
    x = jax.random.normal(k[1], (2, 6, 6, 2))

    def loss_fn(w, x):
        z = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.stack([jnp.mean(jnp.square(z[..., t] - t)) + 0.1 for t in range(T)])

    return loss_fn, w, x


def _stack_fold(carry, start, grads):
    return jax.lax.dynamic_update_slice_in_dim(carry, grads, start, axis=0)


@pytest.mark.parametrize("unroll", [None, True, False])
def test_fold_task_grads_unroll_default_follows_convolutions(unroll):
    """unroll=None: no while loop for a convolutional model on CPU (XLA:CPU runs convolutions in loop
    bodies on a slow kernel), a fori_loop for a dense one; the gradients are the same either way."""
    T = 3
    loss_fn, w, x = _conv_problem(T)
    fold = _fold_task_grads(loss_fn, _stack_fold, chunk_size=1, unroll=unroll)
    init = jnp.zeros((T,) + w.shape)
    run = jax.jit(lambda w, x: fold(init, w, x))
    _, got = run(w, x)
    _, want = dbmtl_jax.value_and_task_grads(loss_fn)(w, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    has_while = " while(" in run.lower(w, x).compile().as_text()
    expect_loop = unroll is False or (unroll is None and jax.default_backend() != "cpu")
    assert has_while == expect_loop

    dense = _fold_task_grads(lambda v, x: jnp.stack([jnp.sum(v * x[t]) ** 2 for t in range(T)]),
                             _stack_fold, chunk_size=1, unroll=unroll)
    v, xs = jnp.ones(4), jnp.arange(12.0).reshape(T, 4)
    run_dense = jax.jit(lambda v, xs: dense(jnp.zeros((T, 4)), v, xs))
    assert (" while(" in run_dense.lower(v, xs).compile().as_text()) == (unroll is not True)


# -- audit 36: arguments that were silently misread or failed with raw errors ------------------------------------


def test_trunk_heads_list_params_give_list_gradients_and_mask():
    """params = [trunk, heads] (a list, which parts() accepts) used to come back as a tuple, so the mask and
    the gradients did not have the parameters' structure (fused init blamed the user's mask)."""
    params, _, trunk_fn, head_fns, x = _problem()
    spec = dbmtl_jax.TrunkHeads(trunk_fn, head_fns)
    as_list = [params["trunk"], list(params["heads"])]
    _, grads = dbmtl_jax.value_and_task_grads(spec)(as_list, x)
    assert jax.tree.structure(spec.shared_mask(as_list)) == jax.tree.structure(as_list)
    assert jax.tree.structure(jax.tree.map(lambda g: g[0], grads)) == jax.tree.structure(as_list)
    _, ref = dbmtl_jax.value_and_task_grads(spec)((params["trunk"], params["heads"]), x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)


def test_trunk_heads_layout_errors_name_the_problem():
    params, _, trunk_fn, head_fns, x = _problem()
    spec = dbmtl_jax.TrunkHeads(trunk_fn, head_fns)
    heads_dict = {f"task{t}": h for t, h in enumerate(params["heads"])}
    with pytest.raises(ValueError, match="tuple or list of 3 head parameter trees.*got dict"):
        dbmtl_jax.value_and_task_grads(spec)((params["trunk"], heads_dict), x)
    split_only = spec._replace(split=lambda p: (p["trunk"], p["heads"]))
    with pytest.raises(ValueError, match="split was given without join"):
        dbmtl_jax.value_and_task_grads(split_only)(params, x)
    with pytest.raises(ValueError, match="split was given without join"):
        split_only.shared_mask(params)


def test_argnums_negative_counts_from_the_end_and_bad_positions_are_named():
    params, losses, *_ = _problem()

    def two_args(batch_scale, p):
        return losses(p) * batch_scale

    ref = dbmtl_jax.value_and_task_grads(two_args, argnums=1)(2.0, params)
    got = dbmtl_jax.value_and_task_grads(two_args, argnums=-1)(2.0, params)  # called loss_fn(x, p, x, p) before
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="argnums=2 needs at least 3 positional"):
        dbmtl_jax.value_and_task_grads(two_args, argnums=2)(2.0, params)
    with pytest.raises(ValueError, match="pass the parameters positionally"):
        dbmtl_jax.value_and_task_grads(losses)(p=params)
    with pytest.raises(TypeError, match="argnums must be a single int"):
        dbmtl_jax.value_and_task_grads(losses, argnums=True)


def test_has_aux_mix_ups_name_has_aux():
    params, losses, *_ = _problem()
    with pytest.raises(ValueError, match="pass has_aux=True"):
        dbmtl_jax.value_and_task_grads(lambda p: (losses(p), {"a": 1.0}))(params)
    with pytest.raises(ValueError, match="pass has_aux=True"):
        dbmtl_jax.value_and_task_grads(lambda p: (losses(p), jnp.sum(losses(p))))(params)
    with pytest.raises(ValueError, match=r"has_aux=True: loss_fn must return a pair \(losses, aux\)"):
        dbmtl_jax.value_and_task_grads(losses, has_aux=True)(params)
    # two scalar losses (T = 2) returned as a tuple are still a loss vector
    got, _ = dbmtl_jax.value_and_task_grads(lambda p: (losses(p)[0], losses(p)[1]))(params)
    np.testing.assert_allclose(got, losses(params)[:2])
    with pytest.raises(ValueError, match="no task losses"):
        dbmtl_jax.value_and_task_grads(lambda p: losses(p)[:0])(params)


def test_an_overflowed_loss_gives_its_task_a_nan_gradient_and_dbmtl_keeps_its_state():
    """ℓ = inf: 1/inf = 0 gave a finite all-zero row, so the bare chain applied the step and decayed that task's
    EMA toward 0 (the fused step skipped it). Now the row is NaN, the other rows are exact, and dbmtl rejects."""
    w = jnp.array([1.0, 2.0])

    def fn(p):  # task 1's loss overflows float32 (3e38 + 3e38) while its derivative stays 1
        return jnp.stack([jnp.sum(p**2) + 1.0, jnp.sum(p) + jnp.float32(3e38) + jnp.float32(3e38), jnp.sum(p) + 1.0])

    losses, grads = dbmtl_jax.value_and_task_grads(fn)(w)
    g = np.asarray(grads)
    assert np.all(np.isnan(g[1]))
    np.testing.assert_allclose(g[0], 2 * np.asarray(w) / 6.0, rtol=1e-6)
    np.testing.assert_allclose(g[2], 1 / 4.0, rtol=1e-6)
    tx = dbmtl_jax.dbmtl(3)
    state = tx.init(w)
    _, state = tx.update(dbmtl_jax.value_and_task_grads(lambda p: fn(p) * jnp.array([1.0, 0.0, 1.0]) + 1.0)(w)[1],
                         state, w)
    updates, new = tx.update(grads, state, w)
    assert np.all(np.isnan(np.asarray(updates)))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_transform_losses_checks_eps_and_takes_a_list():
    from dbmtl_jax.task_gradients import transform_losses

    np.testing.assert_allclose(transform_losses([0.5, 2.0]), np.log(np.array([0.5, 2.0]) + 1e-8), rtol=1e-6)
    for eps in (-1.0, 0.0, float("nan")):  # eps = -1 gave log(ℓ − 1) without a word
        with pytest.raises(ValueError, match="transform_losses: eps must be a finite number > 0"):
            transform_losses(jnp.ones(3), eps=eps)


def test_chunk_size_is_validated_alike_in_both_paths():
    params, losses, *_ = _problem()
    ref = dbmtl_jax.value_and_task_grads(losses)(params)[1]
    for good in (np.int64(2), 2):
        got = dbmtl_jax.value_and_task_grads(losses, chunk_size=good)(params)[1]
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
        _fold_task_grads(losses, lambda c, s, g: c, chunk_size=good)
    for bad in (True, 0, 1.5):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            dbmtl_jax.value_and_task_grads(losses, chunk_size=bad)
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            _fold_task_grads(losses, lambda c, s, g: c, chunk_size=bad)


def test_integer_leaves_and_features_are_refused_by_name():
    params, losses, trunk_fn, head_fns, x = _problem()
    with_int = {**params, "step": jnp.zeros([], jnp.int32)}
    with pytest.raises(TypeError, match=r"leaf \['step'\] has dtype int32"):  # float0 rows before
        dbmtl_jax.value_and_task_grads(lambda p: losses(p))(with_int)
    spec = dbmtl_jax.TrunkHeads(lambda p, b: (trunk_fn(p, b), jnp.arange(3)), [
        (lambda t: lambda hp, z, b: head_fns[t](hp, z[0], b))(t) for t in range(T)])
    with pytest.raises(TypeError, match="trunk_fn must return floating-point features"):
        dbmtl_jax.value_and_task_grads(spec)((params["trunk"], params["heads"]), x)


def test_a_shared_predicate_that_selects_no_leaf_warns():
    """A mistyped prefix (an HPS model's trunk is "encoder/...") made every leaf a head: DB-MTL silently became
    the plain sum of the log-gradients. It still runs, with a warning naming some of the paths."""
    p = {"trunk": jnp.zeros(2), "heads": jnp.zeros(2)}
    with pytest.warns(UserWarning, match="selects no leaf.*'heads', 'trunk'"):
        dbmtl_jax.dbmtl(2, shared=lambda path: path.startswith("encoder")).init(p)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dbmtl_jax.dbmtl(2, shared=lambda path: path.startswith("trunk")).init(p)

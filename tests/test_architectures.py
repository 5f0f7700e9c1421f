"""Multi-task architectures (dbmtl_jax.architectures): shapes, jit, gradients, shared predicates,
NumPy references (cross-stitch, MTAN-MLP, MPNN, set2set), graph invariances, padding, training smoke test."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dbmtl_jax
from dbmtl_jax import task_axis as ta
from dbmtl_jax.architectures import (
    ASPPHead,
    ConvEncoderDecoder,
    CrossStitch,
    DenseHead,
    Graph,
    GraphBatch,
    HPS,
    LeNetEncoder,
    MLPEncoder,
    MLPHead,
    MPNN,
    MTAN,
    hps_spec,
    mtan_conv,
    mtan_mlp,
    mtan_shared_predicate,
    pack_graphs,
    segment_softmax,
    stitch_init,
)

T = 3


# ----------------------------------------------------------------------------- helpers


def _rngs(seed: int) -> nnx.Rngs:
    """RBG keys: initialisers compile far faster on CPU than with threefry (keeps the test group fast)."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _split_losses(model, x, ys):
    """``loss_fn(params) -> [T]`` MSE per task on the model's tuple of outputs, via nnx.split/merge."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p):
        outs = nnx.merge(graphdef, p, rest, copy=True)(x)
        return jnp.stack([jnp.mean(jnp.square(o - y)) for o, y in zip(outs, ys)])

    return loss_fn, params


def _task_grads(model, x, ys):
    loss_fn, params = _split_losses(model, x, ys)
    return jax.jit(dbmtl_jax.value_and_task_grads(loss_fn, log=False))(params)


def _targets(outs, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(o.shape), jnp.float32) for o in outs)


def _multi_task_paths(grads) -> set[str]:
    """Paths of the leaves whose per-task gradient is nonzero for more than one task."""
    flat, _ = jax.tree_util.tree_flatten_with_path(nnx.as_pure(grads))
    out = set()
    for path, g in flat:
        g = np.asarray(g).reshape(g.shape[0], -1)
        if np.sum(np.any(g != 0, axis=1)) > 1:
            out.add(jax.tree_util.keystr(path, simple=True, separator="/"))
    return out


def _selected(pred, model) -> set[str]:
    return {p for p in ta.leaf_paths(nnx.state(model, nnx.Param)) if pred(p)}


def _mlp_hps(rngs, t=T, d_in=5):
    return HPS(MLPEncoder(d_in, (8, 6), rngs=rngs), [MLPHead(6, 2, hidden=(4,), rngs=rngs) for _ in range(t)])


def _tanh_columns(rngs, t=T):
    return [[nnx.Sequential(nnx.Linear(4, 5, rngs=rngs), jnp.tanh), nnx.Sequential(nnx.Linear(5, 3, rngs=rngs), jnp.tanh)]
            for _ in range(t)]


def _np_linear(layer, x):
    return x @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)


# ----------------------------------------------------------------------------- shapes, jit, gradients, predicates

_apply = nnx.jit(lambda m, x: m(x))


def _build(fn):
    return fn(_rngs(0))


@functools.cache
def _case(name):
    """(model, input, output shapes, the shared= predicate, predicate for every task-shared leaf)."""
    if name == "hps_dense":
        # Odd height: the decoder resizes back to the skip connection's size.
        model = _build(lambda r: HPS(ConvEncoderDecoder(3, (4, 4), rngs=r), [
            DenseHead(4, 3, kernel_size=3, hidden=4, norm="group", rngs=r),
            ASPPHead(4, 2, channels=4, rates=(2,), norm="layer", rngs=r)]))
        x = jax.random.normal(jax.random.key(0), (2, 9, 12, 3))
        return model, x, [(2, 9, 12, 3), (2, 9, 12, 2)], HPS.is_shared, HPS.is_shared
    if name == "cross_stitch":
        model = _build(lambda r: CrossStitch(_tanh_columns(r), [nnx.Linear(3, 2, rngs=r) for _ in range(T)]))
        return model, jnp.linspace(-1, 1, 16).reshape(4, 4), [(4, 2)] * T, CrossStitch.is_shared, CrossStitch.is_shared
    if name == "mtan_conv":
        model = _build(lambda r: mtan_conv(3, (4, 4), [DenseHead(4, 2, rngs=r) for _ in range(2)], rngs=r))
        x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
        return model, x, [(2, 4, 4, 2)] * 2, MTAN.is_shared, mtan_shared_predicate(include_bridges=True)
    if name == "mtan_mlp":
        model = _build(lambda r: mtan_mlp(5, (4, 4), [nnx.Linear(4, 1, rngs=r) for _ in range(2)], rngs=r))
        x = jax.random.normal(jax.random.key(2), (6, 5))
        return model, x, [(6, 1)] * 2, MTAN.is_shared, mtan_shared_predicate(include_bridges=True)
    raise KeyError(name)


_CASES = ("hps_dense", "cross_stitch", "mtan_conv", "mtan_mlp")


@pytest.mark.parametrize("name", _CASES)
def test_shapes_jit_finite_task_gradients_and_shared_predicate(name):
    """Per-task outputs under jit; finite per-task gradients; the shared= predicate selects exactly the
    intended leaves, and the leaves receiving gradient from more than one task are exactly the task-shared ones."""
    model, x, shapes, is_shared, task_shared = _case(name)
    outs = nnx.eval_shape(lambda m, x: m(x), model, x)
    assert isinstance(outs, tuple) and [o.shape for o in outs] == shapes
    losses, grads = _task_grads(model, x, _targets(outs))  # the model's forward and backward under jax.jit
    assert losses.shape == (len(shapes),) and bool(jnp.all(jnp.isfinite(losses)))
    for g in jax.tree.leaves(nnx.as_pure(grads)):
        assert g.shape[0] == len(shapes) and bool(jnp.all(jnp.isfinite(g)))

    paths = ta.leaf_paths(nnx.state(model, nnx.Param))
    top = {p.split("/")[0] for p in paths}
    expected_shared = {
        "hps": {"encoder"}, "cross": {"columns", "stitches"}, "mtan": {"backbone"},
    }[name.split("_")[0]]
    assert _selected(is_shared, model) == {p for p in paths if p.split("/")[0] in expected_shared}
    assert not any(is_shared(p) for p in paths if p.startswith("heads/"))
    assert "heads" in top and top - expected_shared
    # Behaviour: which leaves does more than one task's loss reach?
    assert _multi_task_paths(grads) == _selected(task_shared, model)
    if name.startswith("mtan"):
        assert _selected(task_shared, model) == {p for p in paths if p.split("/")[0] in ("backbone", "bridges")}


def test_lenet_multimnist_model_shapes():
    """LeNet encoder + two MLP heads (MultiMNIST): flat width 320 (28×28) / 720 (36×36), 10 logits per task."""
    r = _rngs(0)
    for size, flat, x_shape in [(28, 320, (3, 28, 28)), (36, 720, (3, 36, 36, 1))]:
        model = HPS(LeNetEncoder(1, size, rngs=r), [MLPHead(50, 10, hidden=(50,), rngs=r) for _ in range(2)])
        assert model.encoder.fc.kernel.shape == (flat, 50)
        outs = nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros(x_shape))
        assert [o.shape for o in outs] == [(3, 10), (3, 10)]
    with pytest.raises(ValueError, match="too small"):
        LeNetEncoder(1, 8, rngs=r)


def test_dense_head_receptive_field():
    """A k×k head changes outputs only within (k−1)/2 pixels of a perturbed feature pixel."""
    z = jax.random.normal(jax.random.key(0), (1, 7, 7, 2))
    zz = jnp.concatenate([z, z.at[0, 3, 3].add(1.0)])
    for k in (1, 3):
        out = _apply(DenseHead(2, 2, kernel_size=k, rngs=_rngs(0)), zz)
        diff = np.abs(np.asarray(out[1] - out[0])).sum(-1)
        r = (k - 1) // 2
        expected = np.zeros((7, 7), bool)
        expected[3 - r : 4 + r, 3 - r : 4 + r] = True
        # Far pixels see identical inputs; a blocked conv kernel may still round them differently (float32 noise
        # ~1e-7 of the signal was seen on an AMD EPYC host), so "changed" means above 1e-4 of the largest change.
        np.testing.assert_array_equal(diff > 1e-4 * diff.max(), expected)
    with pytest.raises(ValueError, match="kernel_size"):
        DenseHead(2, 2, kernel_size=5, rngs=_rngs(0))


def test_aspp_image_pooling_branch_gives_global_context():
    """With the pooling branch a far-away pixel influences every output; without it, not beyond the dilations."""
    z = jax.random.normal(jax.random.key(0), (1, 12, 12, 4))
    zz = jnp.concatenate([z, z.at[:, 0, 0].add(3.0)])
    for pooling in (True, False):
        head = ASPPHead(4, 2, channels=4, rates=(2,), image_pooling=pooling, norm="none", rngs=_rngs(0))
        out = _apply(head, zz)
        d = np.abs(np.asarray(out[1] - out[0]))
        # Receptive field without pooling: 3×3 dilation 2 (radius 2), then a 3×3 refine block (radius 1).
        assert bool(d[11, 11].sum() > 0) == pooling
        assert d[1, 1].sum() > 0


def test_hps_predicate_works_with_transforms():
    model = _mlp_hps(_rngs(0))
    state = dbmtl_jax.dbmtl(T, shared=HPS.is_shared).init(nnx.as_pure(nnx.state(model, nnx.Param)))
    assert state.ema["encoder"]["layers"][0]["kernel"].shape == (T, 5, 8)
    assert isinstance(state.ema["heads"][0]["layers"][0]["kernel"], optax.MaskedNode)


# ----------------------------------------------------------------------------- cross-stitch vs NumPy


def _np_cross_stitch(model, x, alphas):
    x = np.asarray(x, np.float64)
    xs = [x] * model.num_tasks
    for layer, a in enumerate(alphas):
        ys = [np.tanh(_np_linear(model.columns[t][layer].layers[0], xs[t])) for t in range(model.num_tasks)]
        a = np.asarray(a, np.float64)
        if a.ndim == 2:
            xs = [sum(a[t, s] * ys[s] for s in range(len(ys))) for t in range(len(ys))]
        else:
            xs = [sum(a[t, s][None, :] * ys[s] for s in range(len(ys))) for t in range(len(ys))]
    return [_np_linear(h, z) for h, z in zip(model.heads, xs)]


@pytest.mark.parametrize("per_channel", [False, True])
def test_cross_stitch_matches_numpy(per_channel):
    r = _rngs(0)
    model = CrossStitch(_tanh_columns(r), [nnx.Linear(3, 2, rngs=r) for _ in range(T)],
                        channels=(5, 3) if per_channel else None)
    # Initial units: 0.9 on, 0.05 off the diagonal (rows sum to one).
    base = np.asarray(model.stitches[0][...])
    base2 = base if base.ndim == 2 else base[..., 0]
    np.testing.assert_allclose(base2, [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]], rtol=1e-6)
    # Random units, then compare with the NumPy forward.
    rng = np.random.default_rng(0)
    for u in model.stitches:
        u[...] = jnp.asarray(rng.uniform(-1, 1, u.shape), jnp.float32)
    x = jax.random.normal(jax.random.key(3), (4, 4))
    got = nnx.jit(lambda m, x: m(x))(model, x)
    want = _np_cross_stitch(model, x, [u[...] for u in model.stitches])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_cross_stitch_identity_units_give_independent_columns():
    r = _rngs(0)
    cols = _tanh_columns(r)
    heads = [nnx.Linear(3, 2, rngs=r) for _ in range(T)]
    model = CrossStitch(cols, heads, diagonal=1.0)
    np.testing.assert_array_equal(np.asarray(model.stitches[1][...]), np.eye(T))
    x = jax.random.normal(jax.random.key(0), (4, 4))
    outs = _apply(model, x)
    indep = nnx.jit(lambda cols, heads, x: [h(c[1](c[0](x))) for c, h in zip(cols, heads)])(cols, heads, x)
    for t in range(T):
        np.testing.assert_allclose(outs[t], indep[t], rtol=1e-6, atol=1e-6)
    # ...and the columns then do not interact: task t's loss has zero gradient in the other columns.
    _, grads = _task_grads(model, x, _targets(outs))
    g = nnx.as_pure(grads)
    for t in range(T):
        for s in range(T):
            k = g["columns"][s][0]["layers"][0]["kernel"][t]
            assert bool(jnp.any(k != 0)) == (s == t)


def test_cross_stitch_init_and_errors():
    np.testing.assert_array_equal(stitch_init(1), [[1.0]])
    np.testing.assert_allclose(stitch_init(2, 0.8), [[0.8, 0.2], [0.2, 0.8]], rtol=1e-6)
    r = _rngs(0)
    with pytest.raises(ValueError, match="same, nonzero number of stages"):
        CrossStitch([[nnx.Linear(2, 2, rngs=r)], []], [nnx.Linear(2, 1, rngs=r)] * 2)
    with pytest.raises(ValueError, match="heads"):
        CrossStitch([[nnx.Linear(2, 2, rngs=r)]] * 2, [nnx.Linear(2, 1, rngs=r)])
    bad = CrossStitch([[nnx.Linear(2, 2, rngs=r)], [nnx.Linear(2, 3, rngs=r)]],
                      [nnx.Linear(2, 1, rngs=r) for _ in range(2)])
    with pytest.raises(ValueError, match="different output shapes"):
        bad(jnp.ones((1, 2)))


def test_cross_stitch_single_task():
    r = _rngs(0)
    model = CrossStitch.from_factory(lambda rr: [nnx.Linear(4, 3, rngs=rr)], [nnx.Linear(3, 1, rngs=r)], rngs=r)
    x = jnp.ones((2, 4))
    np.testing.assert_allclose(_apply(model, x)[0], model.heads[0](model.columns[0][0](x)), rtol=1e-6)


# ----------------------------------------------------------------------------- MTAN


def test_mtan_masks_in_open_unit_interval_and_shapes():
    model, x, _, _, _ = _case("mtan_conv")
    masks = nnx.jit(lambda m, x: m.masks(x))(model, x * 5.0)
    assert len(masks) == 2
    for per_task in masks:
        assert [m.shape for m in per_task] == [(2, 8, 8, 4), (2, 4, 4, 4)]
        for m in per_task:
            assert bool(jnp.all(m > 0)) and bool(jnp.all(m < 1))
    # Different tasks have their own masks.
    assert not np.allclose(masks[0][1], masks[1][1])


def _np_mtan_mlp(model, x):
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    relu = lambda z: np.maximum(z, 0.0)
    x = np.asarray(x, np.float64)
    ps = []
    for stage in model.backbone:
        x = relu(_np_linear(stage.layers[0], x))
        ps.append(x)
    outs = []
    for t in range(model.num_tasks):
        a = None
        for j, p in enumerate(ps):
            z = p if j == 0 else np.concatenate([p, relu(_np_linear(model.bridges[j - 1].dense, a))], -1)
            att = model.attention[t][j]
            m = sig(_np_linear(att.conv2, relu(_np_linear(att.conv1, z))))
            a = m * p
        outs.append(_np_linear(model.heads[t], a))
    return outs


def test_mtan_mlp_matches_numpy():
    r = _rngs(0)
    model = mtan_mlp(5, (8, 6, 4), [nnx.Linear(4, 2, rngs=r) for _ in range(T)], norm="none", rngs=r)
    x = jax.random.normal(jax.random.key(0), (6, 5))
    got = nnx.jit(lambda m, x: m(x))(model, x)
    for g, w in zip(got, _np_mtan_mlp(model, x)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_mtan_stage_pair_and_errors():
    """A stage returning (u, p): the mask is computed from u and multiplies p."""
    r = _rngs(0)

    class Pair(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(3, 4, rngs=r)

        def __call__(self, x):
            u = self.lin(x)
            return u, 2.0 * u

    model = MTAN([Pair()], (4,), [nnx.Linear(4, 1, rngs=r)], kind="mlp", norm="none", rngs=r)
    x = jax.random.normal(jax.random.key(0), (5, 3))
    u = model.backbone[0].lin(x)
    np.testing.assert_allclose(model.features(x)[0], model.attention[0][0](u) * 2.0 * u, rtol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        MTAN([Pair()], (4,), [nnx.Linear(4, 1, rngs=r)], kind="transformer", rngs=r)
    with pytest.raises(ValueError, match="norm"):
        MTAN([Pair()], (4,), [nnx.Linear(4, 1, rngs=r)], norm="weird", rngs=r)
    with pytest.raises(ValueError, match="channels"):
        MTAN([Pair()], (4, 4), [nnx.Linear(4, 1, rngs=r)], rngs=r)


# ----------------------------------------------------------------------------- HPS + TrunkHeads


def test_hps_trunk_heads_spec_equals_value_and_task_grads():
    model = _mlp_hps(_rngs(0))
    x = jax.random.normal(jax.random.key(0), (8, 5))
    ys = _targets(_apply(model, x), seed=1)
    ys = tuple(y * s for y, s in zip(ys, (1.0, 10.0, 0.1)))
    # Reference: per-task gradients of log(ℓ_t) of the whole model.
    loss_fn, params = _split_losses(model, x, ys)
    ref_losses, ref = jax.jit(dbmtl_jax.value_and_task_grads(loss_fn))(params)

    # A TrunkHeads spec written directly: trunk = encoder, head t = heads[t] (nnx.split / nnx.merge).
    enc_def, enc_p, enc_rest = nnx.split(model.encoder, nnx.Param, ...)
    hs = [nnx.split(h, nnx.Param, ...) for h in model.heads]

    def trunk_fn(p, batch):
        return nnx.merge(enc_def, p, enc_rest, copy=True)(batch[0])

    def head_loss(t):
        return lambda hp, z, batch: jnp.mean(jnp.square(nnx.merge(hs[t][0], hp, hs[t][2], copy=True)(z) - batch[1][t]))

    # Only the encoder leaves receive gradient from more than one task.
    assert _multi_task_paths(ref) == _selected(HPS.is_shared, model) == {
        "encoder/" + p for p in ta.leaf_paths(nnx.state(model.encoder, nnx.Param))}

    fn = jax.jit(dbmtl_jax.value_and_task_grads(dbmtl_jax.TrunkHeads(trunk_fn, [head_loss(t) for t in range(T)])))
    losses, (tg, hg) = fn((enc_p, [h[1] for h in hs]), (x, ys))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(nnx.as_pure(tg)), jax.tree.leaves(nnx.as_pure(ref["encoder"]))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for t in range(T):
        for a, b in zip(jax.tree.leaves(nnx.as_pure(hg[t])), jax.tree.leaves(nnx.as_pure(ref["heads"][t]))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
            assert not np.any(np.delete(np.asarray(b), t, axis=0)) and not np.any(np.delete(np.asarray(a), t, axis=0))

    # The packaged spec returns the same, in the nnx.state(model, nnx.Param) structure.
    head_losses = [lambda o, y, t=t: jnp.mean(jnp.square(o - y[t])) for t in range(T)]
    helper = nnx.jit(lambda m, x, ys: dbmtl_jax.value_and_task_grads(hps_spec(m, head_losses))(
        nnx.state(m, nnx.Param), (x, ys)))
    losses2, grads2 = helper(model, x, ys)
    np.testing.assert_allclose(losses2, ref_losses, rtol=1e-6)
    assert jax.tree.structure(nnx.as_pure(grads2)) == jax.tree.structure(nnx.as_pure(ref))
    for a, b in zip(jax.tree.leaves(nnx.as_pure(grads2)), jax.tree.leaves(nnx.as_pure(ref))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_training_smoke_dbmtl_lowers_every_task_loss():
    """A few Adam steps with DB-MTL on an HPS model (nnx.Optimizer, trunk/heads task gradients)."""
    model = _mlp_hps(_rngs(0))
    x = jax.random.normal(jax.random.key(0), (32, 5))
    w = jax.random.normal(jax.random.key(1), (T, 5, 2))
    ys = tuple(jnp.tanh(x @ w[t]) * s for t, s in enumerate((1.0, 3.0, 0.2)))
    tx = optax.chain(dbmtl_jax.dbmtl(T, shared=HPS.is_shared), optax.adam(2e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    head_losses = [lambda o, y, t=t: jnp.mean(jnp.square(o - y[t])) for t in range(T)]

    @nnx.jit
    def step(model, optimizer):
        grad_fn = dbmtl_jax.value_and_task_grads(hps_spec(model, head_losses))
        losses, grads = grad_fn(nnx.state(model, nnx.Param), (x, ys))
        optimizer.update(model, grads)
        return losses

    first = step(model, optimizer)
    for _ in range(30):
        last = step(model, optimizer)
    assert bool(jnp.all(jnp.isfinite(last)))
    assert bool(jnp.all(last < 0.7 * first)), (first, last)
    assert int(optimizer.opt_state[0].count) == 31


def test_fused_step_on_hps_spec_equals_the_chain():
    """fused_dbmtl(hps_spec(model, …)) on nnx.state(model, nnx.Param) takes the steps of
    chain(dbmtl(T, shared=HPS.is_shared), adam) fed by value_and_task_grads(hps_spec(model, …))."""
    model = _mlp_hps(_rngs(0))
    x = jax.random.normal(jax.random.key(0), (16, 5))
    ys = tuple(y * s for y, s in zip(_targets(_apply(model, x), seed=2), (1.0, 10.0, 0.1)))
    head_losses = [lambda o, y, t=t: jnp.mean(jnp.square(o - y[t])) for t in range(T)]
    spec = hps_spec(model, head_losses)
    params = nnx.state(model, nnx.Param)
    tx = optax.chain(dbmtl_jax.dbmtl(T, shared=HPS.is_shared), optax.adam(1e-2))
    fused = dbmtl_jax.fused_dbmtl(spec, T, optax.adam(1e-2))
    grads = jax.jit(dbmtl_jax.value_and_task_grads(spec))
    p1, s1, p2, s2 = params, tx.init(params), params, fused.init(params)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    for _ in range(3):
        l1, g = grads(p1, (x, ys))
        u1, s1 = tx.update(g, s1, p1)
        l2, u2, s2 = jax.jit(fused.update)(s2, p2, (x, ys))
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_hps_errors_and_single_task():
    r = _rngs(0)
    with pytest.raises(ValueError, match="heads"):
        HPS(MLPEncoder(3, (4,), rngs=r), [])
    for cls, args in [(MLPEncoder, (3, (4,))), (ConvEncoderDecoder, (2, (3,))), (ASPPHead, (2, 2))]:
        with pytest.raises(ValueError, match="norm"):
            cls(*args, norm="instance", rngs=r)
    model = HPS(MLPEncoder(3, (4,), rngs=r), [nnx.Linear(4, 1, rngs=r)])
    x = jnp.ones((2, 3))
    np.testing.assert_allclose(_apply(model, x)[0], model.head(0, model.features(x)), rtol=1e-6)
    spec_grads = nnx.jit(lambda m, b: dbmtl_jax.value_and_task_grads(hps_spec(m, [lambda o, y: jnp.mean((o - y) ** 2)]))(
        nnx.state(m, nnx.Param), b))
    losses, grads = spec_grads(model, (x, jnp.zeros((2, 1))))
    assert losses.shape == (1,) and grads["encoder"]["layers"][0]["kernel"].shape == (1, 3, 4)


# ----------------------------------------------------------------------------- MPNN


def _random_graph(rng, n, f=3, fe=2):
    pairs = [(i, j) for i in range(n) for j in range(n) if i < j and rng.random() < 0.6]
    if not pairs and n > 1:
        pairs = [(0, 1)]
    ei = np.array([p for a, b in pairs for p in ((a, b), (b, a))], np.int64).reshape(-1, 2).T
    ef = rng.normal(size=(ei.shape[1], fe)).astype(np.float32)
    return Graph(rng.normal(size=(n, f)).astype(np.float32), ei.reshape(2, -1), ef)


def _graphs(seed=0, sizes=(4, 2, 5, 3)):
    rng = np.random.default_rng(seed)
    return [_random_graph(rng, n) for n in sizes]


def _mpnn(readout="set2set", aggregation="mean", **kw):
    return MPNN(3, 2, dim=8, edge_hidden=16, steps=2, readout=readout, aggregation=aggregation,
                rngs=_rngs(0), **kw)


def test_pack_graphs_layout():
    gs = _graphs()
    b = pack_graphs(gs, max_nodes=20, max_edges=40, max_graphs=6)
    assert b.node_features.shape == (20, 3) and b.edge_index.shape == (2, 40) and b.edge_features.shape == (40, 2)
    assert b.num_graphs == 6 and b.graph_mask.tolist() == [True] * 4 + [False] * 2
    assert b.node_mask.sum() == 14 and b.edge_mask.sum() == sum(g.edge_index.shape[1] for g in gs)
    assert b.node_graph[:14].tolist() == [0] * 4 + [1] * 2 + [2] * 5 + [3] * 3
    np.testing.assert_array_equal(b.edge_index[:, : gs[0].edge_index.shape[1]], gs[0].edge_index)
    np.testing.assert_array_equal(b.edge_index[:, gs[0].edge_index.shape[1]:][:, :2], gs[1].edge_index[:, :2] + 4)
    # num_graphs is static metadata, not a leaf.
    assert len(jax.tree.leaves(b)) == 7
    with pytest.raises(ValueError, match="smaller than the batch"):
        pack_graphs(gs, max_nodes=5)
    with pytest.raises(ValueError, match="edge_index"):
        pack_graphs([Graph(np.zeros((2, 3)), np.array([[0], [2]]), np.zeros((1, 2)))])


_cell = nnx.jit(lambda cell, carry, x: cell(carry, x))


def _np_mpnn(model, b):
    """Loop-over-edges NumPy message passing; GRU and LSTM cells called as black boxes."""
    relu = lambda z: np.maximum(z, 0.0)
    x = np.asarray(b.node_features, np.float64)
    n, d = x.shape[0], model.dim
    h = relu(_np_linear(model.embed, x)) * b.node_mask[:, None]
    l1, l2 = model.edge_net.layers[0], model.edge_net.layers[2]
    for _ in range(model.steps):
        agg = np.zeros((n, d))
        deg = np.zeros(n)
        for k in range(b.edge_index.shape[1]):
            s, rcv = b.edge_index[:, k]
            if not (b.edge_mask[k] and b.node_mask[s] and b.node_mask[rcv]):
                continue
            a = _np_linear(l2, relu(_np_linear(l1, np.asarray(b.edge_features[k], np.float64)))).reshape(d, d)
            agg[rcv] += a @ h[s]
            deg[rcv] += 1
        if model.aggregation == "mean":
            agg = agg / np.maximum(deg, 1)[:, None]
        m = relu(_np_linear(model.root, h) + agg)
        h, _ = _cell(model.gru, jnp.asarray(h, jnp.float32), jnp.asarray(m, jnp.float32))
        h = np.asarray(h, np.float64) * b.node_mask[:, None]
    g = b.num_graphs
    if model.readout == "set2set":
        q_star = np.zeros((g, 2 * d))
        carry = (jnp.zeros((g, d)), jnp.zeros((g, d)))
        for _ in range(model.set2set.steps):
            carry, q = _cell(model.set2set.lstm, carry, jnp.asarray(q_star, jnp.float32))
            q = np.asarray(q, np.float64)
            r = np.zeros((g, d))
            for gi in range(g):
                idx = np.where((b.node_graph == gi) & b.node_mask)[0]
                if len(idx):
                    e = h[idx] @ q[gi]
                    a = np.exp(e - e.max())
                    r[gi] = (a / a.sum()) @ h[idx]
            q_star = np.concatenate([q, r], -1)
        out = q_star
    else:
        out = np.zeros((g, d))
        for gi in range(g):
            idx = np.where((b.node_graph == gi) & b.node_mask)[0]
            if len(idx):
                out[gi] = h[idx].sum(0) if model.readout == "sum" else h[idx].mean(0)
    out = relu(_np_linear(model.out, out))
    return out * b.graph_mask[:, None]


@pytest.mark.parametrize("readout,aggregation", [("set2set", "mean"), ("sum", "sum")])
def test_mpnn_matches_numpy_reference(readout, aggregation):
    model = _mpnn(readout, aggregation)
    b = pack_graphs(_graphs(), max_nodes=16, max_edges=40, max_graphs=5)
    got = _apply(model, b)
    assert got.shape == (5, 8)
    np.testing.assert_allclose(got, _np_mpnn(model, b), rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(got[4]) == 0)


def test_mpnn_invariant_to_node_permutation_and_graph_order():
    model = _mpnn("set2set")
    gs = _graphs(seed=1)
    base = np.asarray(_apply(model, pack_graphs(gs, max_nodes=16, max_edges=40, max_graphs=4)))
    rng = np.random.default_rng(2)
    # Permute nodes (and edges) inside every graph.
    permuted = []
    for g in gs:
        n = g.node_features.shape[0]
        perm = rng.permutation(n)  # new node i is old node perm[i]
        inv = np.argsort(perm)
        eperm = rng.permutation(g.edge_index.shape[1])
        permuted.append(Graph(g.node_features[perm], inv[g.edge_index][:, eperm], g.edge_features[eperm]))
    out = _apply(model, pack_graphs(permuted, max_nodes=16, max_edges=40, max_graphs=4))
    np.testing.assert_allclose(out, base, rtol=1e-5, atol=1e-6)
    # Reorder the graphs of the batch.
    order = np.array([2, 0, 3, 1])
    out = _apply(model, pack_graphs([gs[i] for i in order], max_nodes=16, max_edges=40, max_graphs=4))
    np.testing.assert_allclose(out, base[order], rtol=1e-5, atol=1e-6)
    # Sanity: the features do depend on the graph.
    assert not np.allclose(base[0], base[1])


@pytest.mark.parametrize("readout,aggregation", [("set2set", "mean"), ("mean", "sum")])
def test_mpnn_padding_does_not_change_outputs(readout, aggregation):
    model = _mpnn(readout, aggregation)
    gs = _graphs(seed=3)
    tight = np.asarray(_apply(model, pack_graphs(gs)))
    padded = pack_graphs(gs, max_nodes=24, max_edges=50, max_graphs=7)
    # Fill the padding with junk: random features, padding edges into real nodes, padding node ids in range.
    rng = np.random.default_rng(4)
    nm, em = padded.node_mask, padded.edge_mask
    x = padded.node_features.copy()
    x[~nm] = rng.normal(size=x[~nm].shape) * 100
    ef = padded.edge_features.copy()
    ef[~em] = rng.normal(size=ef[~em].shape) * 100
    ei = padded.edge_index.copy()
    ei[:, ~em] = rng.integers(0, 24, size=(2, int((~em).sum())))
    ng = padded.node_graph.copy()
    ng[~nm] = rng.integers(0, 7, size=int((~nm).sum()))
    junk = padded._replace(node_features=x, edge_features=ef, edge_index=ei, node_graph=ng)
    for batch in (padded, junk):
        out = np.asarray(_apply(model, batch))
        np.testing.assert_allclose(out[: len(gs)], tight, rtol=1e-5, atol=1e-6)
        assert np.all(out[len(gs):] == 0)


def test_mpnn_unmasked_batch_gradients_and_hps_heads():
    """QM9-style HPS: MPNN encoder + one linear head per target; masks may be None; every parameter
    gets a finite, nonzero gradient (all are used, including the set2set LSTM)."""
    gs = _graphs(seed=5)
    b = pack_graphs(gs)
    b = GraphBatch(b.node_features, b.edge_index, b.edge_features, b.node_graph, b.num_graphs)
    # Three set2set steps (the default): with fewer, the zero-initialised LSTM state leaves the
    # recurrent kernels without gradient at initialisation.
    r = _rngs(0)
    model = HPS(MPNN(3, 2, dim=8, edge_hidden=16, steps=1, rngs=r), [nnx.Linear(8, 1, rngs=r) for _ in range(T)])
    outs = nnx.eval_shape(lambda m, g: m(g), model, b)
    assert [o.shape for o in outs] == [(4, 1)] * T
    ys = _targets(outs)
    grads = nnx.jit(nnx.grad(lambda m: sum(jnp.mean(jnp.square(o - y)) for o, y in zip(m(b), ys))))(model)
    for path, g in jax.tree_util.tree_flatten_with_path(nnx.as_pure(grads))[0]:
        assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0)), jax.tree_util.keystr(path)


def test_segment_softmax_and_mpnn_errors():
    logits = jnp.array([1.0, 2.0, 3.0, 50.0, 0.0])
    seg = jnp.array([0, 0, 1, 1, 2])
    mask = jnp.array([True, True, True, False, False])
    p = np.asarray(segment_softmax(logits, seg, mask, 4))
    e = np.exp([1.0, 2.0])
    np.testing.assert_allclose(p, [e[0] / e.sum(), e[1] / e.sum(), 1.0, 0.0, 0.0], rtol=1e-6)
    for kw, name in [(dict(aggregation="max"), "aggregation"), (dict(readout="attention"), "readout")]:
        with pytest.raises(ValueError, match=name):
            _mpnn(**kw)
    b = pack_graphs(_graphs())
    with pytest.raises(ValueError, match="num_graphs"):
        _mpnn()(b._replace(num_graphs=0))


# ----------------------------------------------------------------------------- bad input (audit 44)


def test_batch_norm_refuses_fewer_than_two_values_per_channel_in_training():
    """One value per channel made the output the constant β (masks of 0.5), none wrote NaN into the
    running statistics; both are errors in training mode, and fine with the running averages."""
    r = _rngs(0)
    enc = MLPEncoder(3, (4,), norm="batch", rngs=r)
    with pytest.raises(ValueError, match="1 value\\(s\\) per channel"):
        enc(jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="0 value\\(s\\) per channel"):
        enc(jnp.ones((0, 3)))
    assert np.all(np.isfinite(np.asarray(enc.norms[0].mean[...])))
    model = mtan_mlp(3, (4, 4), [nnx.Linear(4, 1, rngs=r) for _ in range(2)], rngs=r)
    with pytest.raises(ValueError, match="per channel"):
        model(jnp.ones((1, 3)))
    # Spatial positions count: one image of 2×2 pixels is a valid training batch.
    assert ConvEncoderDecoder(1, (2,), rngs=r)(jnp.ones((1, 2, 2, 1))).shape == (1, 2, 2, 2)
    enc.eval()
    assert enc(jnp.ones((1, 3))).shape == (1, 4) and enc(jnp.ones((0, 3))).shape == (0, 4)
    model.eval()
    assert [o.shape for o in model(jnp.ones((1, 3)))] == [(1, 1)] * 2


def test_parameters_shared_between_tasks_are_an_error():
    """``[head] * T`` gave every task the same head (listed once by nnx.state, so the shared/task-specific
    partition and hps_spec were wrong); a column reused for every task made cross-stitch a single network."""
    r = _rngs(0)
    head = nnx.Linear(4, 1, rngs=r)
    enc = MLPEncoder(3, (4,), rngs=r)
    with pytest.raises(ValueError, match=r"heads\[1\] and heads\[0\] share parameters"):
        HPS(enc, [head] * 3)
    with pytest.raises(ValueError, match=r"heads\[0\] and encoder share parameters"):
        HPS(enc, [nnx.Sequential(enc.layers[0]), nnx.Linear(4, 1, rngs=r)])
    column = [nnx.Linear(4, 3, rngs=r)]
    with pytest.raises(ValueError, match=r"columns\[1\] and columns\[0\] share parameters"):
        CrossStitch([column] * 2, [nnx.Linear(3, 1, rngs=r) for _ in range(2)])
    with pytest.raises(ValueError, match=r"heads\[1\] and heads\[0\] share parameters"):
        mtan_mlp(3, (4,), [head] * 2, rngs=r)
    # Weight tying inside one part stays allowed.
    HPS(MLPEncoder(3, (4,), rngs=r), [nnx.Sequential(head, head.__class__(1, 1, rngs=r)), nnx.Linear(4, 1, rngs=r)])


def test_mtan_stage_outputs_must_match_the_declared_channels():
    class Stage(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 4, rngs=rngs)

        def __call__(self, x):
            u = self.dense(x)
            return u, u[:, :1]  # p narrower than u: the [B, 4] mask used to broadcast over it

    r = _rngs(0)
    model = MTAN([Stage(r)], (4,), [nnx.Linear(4, 1, rngs=r) for _ in range(2)], kind="mlp", norm="none", rngs=r)
    with pytest.raises(ValueError, match="stage 0 returned u of shape \\(5, 4\\) and p of shape \\(5, 1\\)"):
        model(jnp.ones((5, 3)))
    model = mtan_mlp(3, (4,), [nnx.Linear(4, 1, rngs=r) for _ in range(2)], norm="none", rngs=r)
    model.channels = (5,)
    with pytest.raises(ValueError, match="channels\\[0\\] = 5"):
        model(jnp.ones((2, 3)))


def test_image_encoders_empty_batch_and_layout_errors():
    r = _rngs(0)
    lenet = LeNetEncoder(1, 28, rngs=r)
    assert lenet(jnp.zeros((0, 28, 28))).shape == (0, 50)  # was a ZeroDivisionError in reshape(0, -1)
    for bad in [(2, 1, 28, 28), (28, 28, 1), (2, 784), (2, 36, 36)]:
        with pytest.raises(ValueError, match="LeNetEncoder expects NHWC images"):
            lenet(jnp.zeros(bad))
    with pytest.raises(ValueError, match="NCHW\\?"):
        ConvEncoderDecoder(3, (4,), rngs=r)(jnp.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="DenseHead expects NHWC images with 4 channel"):
        DenseHead(4, 2, rngs=r)(jnp.zeros((2, 8, 8)))


def _nan_padded(b):
    x = b.node_features.copy()
    x[~b.node_mask] = np.nan
    ef = b.edge_features.copy()
    ef[~b.edge_mask] = np.nan
    return b._replace(node_features=x, edge_features=ef)


@pytest.mark.parametrize("readout", ["set2set", "sum"])
def test_mpnn_nan_in_padding_features_does_not_leak(readout):
    """Padding rows were multiplied by 0, and NaN · 0 = NaN reached every output and gradient."""
    model = _mpnn(readout)
    b = pack_graphs(_graphs(seed=6), max_nodes=20, max_edges=40, max_graphs=6)
    clean = np.asarray(_apply(model, b))
    np.testing.assert_array_equal(np.asarray(_apply(model, _nan_padded(b))), clean)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p, g: jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(g))))(params, _nan_padded(b))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_mpnn_out_of_range_indices_and_bad_shapes():
    """Real edges and nodes with indices outside the batch were clipped onto node 0 / N−1 or graph G−1."""
    model = _mpnn("sum")
    b = pack_graphs(_graphs(seed=7), max_nodes=20, max_edges=40, max_graphs=6)
    base = np.asarray(_apply(model, b))
    k = int(np.flatnonzero(b.edge_mask)[0])
    ei = b.edge_index.copy()
    ei[0, k] = -1
    with pytest.raises(ValueError, match=f"edge_index: sender -1 at position {k} is outside \\[0, 20\\)"):
        model(b._replace(edge_index=ei))
    assert np.all(np.isnan(np.asarray(_apply(model, b._replace(edge_index=ei)))))
    ng = b.node_graph.copy()
    ng[0] = 6
    with pytest.raises(ValueError, match="node_graph: graph id 6 at position 0 is outside \\[0, 6\\)"):
        model(b._replace(node_graph=ng))
    assert np.all(np.isnan(np.asarray(_apply(model, b._replace(node_graph=ng)))))
    # Padding entries may hold any index (e.g. -1), eagerly and under jit.
    ei, ng = b.edge_index.copy(), b.node_graph.copy()
    ei[:, ~b.edge_mask] = -1
    ng[~b.node_mask] = -1
    pad = b._replace(edge_index=ei, node_graph=ng)
    np.testing.assert_allclose(np.asarray(model(pad)), base, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(_apply(model, pad)), base)
    for field, value, name in [("edge_index", b.edge_index.T, "edge_index must be \\[2, E\\]"),
                               ("edge_mask", b.edge_mask[:1], "edge_mask must have shape \\(40,\\)"),
                               ("node_mask", b.node_mask[:, None], "node_mask must have shape \\(20,\\)"),
                               ("node_graph", b.node_graph[:, None], "node_graph must have shape \\(20,\\)"),
                               ("edge_features", b.edge_features[:5], "edge_features must be \\[E, Fe\\]")]:
        with pytest.raises(ValueError, match=name):
            model(b._replace(**{field: value}))


def test_mpnn_options_that_were_ignored_are_errors():
    with pytest.raises(ValueError, match="out_features=16 needs project=True"):
        _mpnn(project=False, out_features=16)
    with pytest.raises(ValueError, match="set2set steps must be >= 1"):
        _mpnn(set2set_steps=0)


def test_non_integer_indices_and_counts_are_errors_not_truncations():
    """pack_graphs cast a float edge_index into int32 (1.5 became node 1); a float num_graphs was truncated
    by the pytree flatten under jit; cross-stitch cast its mix back to an integer stage output's dtype."""
    x, ef = np.ones((3, 3), np.float32), np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match="edge_index must hold integer node indices"):
        pack_graphs([Graph(x, np.array([[0.0, 1.5], [1.0, 2.0]]), ef)])
    b = pack_graphs([Graph(x, np.array([[0.0, 1.0], [1.0, 2.0]]), ef)])  # integral floats are fine
    assert b.edge_index.tolist() == [[0, 1], [1, 2]]
    b = pack_graphs([Graph(x, np.array([[0, 1], [1, 2]]), ef)] * 2)
    with pytest.raises(ValueError, match="num_graphs must be a static int, got 1.7"):
        _apply(_mpnn("sum"), b._replace(num_graphs=1.7, graph_mask=None))
    ident = lambda: nnx.Sequential(lambda z: z)
    model = CrossStitch([[ident()] for _ in range(2)], [ident() for _ in range(2)], diagonal=0.75)
    outs = model(jnp.array([[4, 8]]))
    np.testing.assert_allclose(outs[0], [[4.0, 8.0]], rtol=1e-6)  # 0.75·x + 0.25·x, not truncated
    np.testing.assert_allclose(model.stitch(0, [jnp.array([1]), jnp.array([2])])[0], [1.25], rtol=1e-6)
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        stitch_init(0)

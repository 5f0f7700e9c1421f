"""Renamed modules and names keep working for one version, with a DeprecationWarning naming the new one."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

pytest.importorskip("flax")

from flax import nnx  # noqa: E402

from dbmtl_jax.experiments import builtin, spec  # noqa: E402


@pytest.mark.parametrize("old,name,new", [
    ("dbmtl_jax.experiments.benchmark", "Benchmark", spec.Benchmark),
    ("dbmtl_jax.experiments.benchmark", "register_benchmark", spec.register_benchmark),
    ("dbmtl_jax.experiments.benchmarks", "mse_loss", builtin.mse_loss),
    ("dbmtl_jax.experiments.benchmarks", "MLPHPS", builtin.mlp_hps),
])
def test_old_module_names_warn_and_give_the_new_objects(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match="deprecated"):
        assert getattr(module, name) is new
    with pytest.raises(AttributeError):
        getattr(module, "no_such_name")


def test_mlp_hps_is_hps_of_mlp_encoder_with_scalar_heads():
    from dbmtl_jax.architectures import HPS, MLPEncoder, MLPHead

    m = builtin.mlp_hps(8, (16, 4), 3, head_bias=[1.0, 2.0, 3.0], rngs=nnx.Rngs(0))
    assert isinstance(m, HPS) and isinstance(m.encoder, MLPEncoder)
    assert all(isinstance(h, MLPHead) for h in m.heads)
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    ys = m(x)
    assert [y.shape for y in ys] == [(5,)] * 3  # one scalar per example and task
    z = m.encoder(x)
    for t, (y, head) in enumerate(zip(ys, m.heads)):
        layer = head.layers[0]
        np.testing.assert_allclose(y, (z @ layer.kernel[...] + layer.bias[...])[:, 0], rtol=1e-6)
        assert float(layer.bias[...][0]) == t + 1.0
    with pytest.raises(ValueError, match="squeeze"):
        MLPHead(4, 2, squeeze=True, rngs=nnx.Rngs(0))

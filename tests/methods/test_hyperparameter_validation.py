"""Hyperparameter validation at construction (issue 13, item 4).

Every factory of the methods below must reject an out-of-range or wrongly typed
hyperparameter when it is built, with an error that names the method and the
option (and, for a range, the accepted range).  Construction only: no jit, no
update, so the file is fast.
"""

from __future__ import annotations

import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dbmtl_jax.methods.registry import METHODS, get_factory, get_method

T = 3
NAN, INF = math.nan, math.inf

# Methods whose validation this file covers (mgda, cagrad, imtl_g, upgrad, nash_mtl, fairgrad, aligned_mtl
# and dbmtl are validated by their own tests).
COVERED = (
    "ew", "gls", "rlw", "uw", "dwa", "imtl_l", "igbv2", "gradnorm", "pcgrad", "graddrop", "gradvac",
    "mtadam", "metabalance", "moco", "imtl", "famo", "stch", "excessmtl",
)
# Hyperparameters not validated here: `shared` is resolved against the parameters by task_axis.
UNCHECKED = {"num_tasks", "shared"}


def case(method, exc=ValueError, expect=None, num_tasks=T, **kw):
    """One bad setting: ``method(num_tasks, **kw)`` raises ``exc`` naming the option (and ``expect``)."""
    (option, value), = kw.items()
    return pytest.param(method, num_tasks, kw, exc, expect, id=f"{method}-{option}={value!r}")


def _adam_cases(m):
    return [
        case(m, init=INF, expect="finite"),
        case(m, init=[0.0, 0.0], expect="shape"),
        case(m, learning_rate=-1e-4, expect=">= 0"),
        case(m, TypeError, learning_rate="fast"),
        case(m, b1=1.0, expect="in [0, 1)"),
        case(m, b1=-0.1, expect="in [0, 1)"),
        case(m, b2=1.5, expect="in [0, 1)"),
        case(m, adam_eps=-1e-8, expect=">= 0"),
        case(m, weight_decay=-1e-5, expect=">= 0"),
        case(m, grads="both", expect="grads"),
        case(m, TypeError, weight_heads="yes"),
    ]


BAD = [
    # ---- loss weighting
    case("ew", reduction="median", expect="one of"),
    case("ew", grads="both", expect="one of"),
    case("ew", TypeError, weight_heads=None),
    case("gls", eps=0.0, expect="> 0"),
    case("gls", eps=-1e-8, expect="> 0"),
    case("gls", eps=NAN, expect="finite"),
    case("gls", TypeError, eps="tiny"),
    case("gls", grads="sum", expect="one of"),
    case("gls", TypeError, weight_heads=1),
    case("rlw", distribution="gamma", expect="one of"),
    case("rlw", distribution="bernoulli", num_tasks=31, expect="at most 30 tasks"),
    case("rlw", grads="x", expect="one of"),
    case("rlw", TypeError, weight_heads="no"),
    *_adam_cases("uw"),
    *_adam_cases("imtl_l"),
    case("dwa", temperature=0.0, expect="> 0"),
    case("dwa", temperature=-2.0, expect="> 0"),
    case("dwa", TypeError, temperature=None),
    case("dwa", steps_per_epoch=0, expect=">= 1"),
    case("dwa", TypeError, steps_per_epoch=1.5),
    case("dwa", grads="x", expect="one of"),
    case("dwa", TypeError, weight_heads="x"),
    case("igbv2", steps_per_epoch=0, expect=">= 1"),
    case("igbv2", base_epoch=-1, expect=">= 0"),
    case("igbv2", start_epoch=-1, expect=">= 0"),
    case("igbv2", update_after=-1, expect=">= 0"),
    case("igbv2", update_every=0, expect=">= 1"),
    case("igbv2", TypeError, update_every=2.5),
    case("igbv2", buffer_size=0, expect=">= 1"),
    case("igbv2", seed=-1, expect=">= 0"),
    case("igbv2", sac_hidden=(), expect="positive ints"),
    case("igbv2", sac_hidden=(16, 0), expect="positive ints"),
    case("igbv2", TypeError, sac_hidden=128),
    case("igbv2", sac_lr=-3e-4, expect=">= 0"),
    case("igbv2", discount=1.5, expect="in [0, 1]"),
    case("igbv2", discount=-0.1, expect="in [0, 1]"),
    case("igbv2", tau=0.0, expect="in (0, 1]"),
    case("igbv2", tau=1.5, expect="in (0, 1]"),
    case("igbv2", init_alpha=0.0, expect="> 0"),
    case("igbv2", reward_scale=-1.0, expect="> 0"),
    case("igbv2", reward_scale=0.0, expect="> 0"),
    case("igbv2", eps=0.0, expect="> 0"),
    case("igbv2", grads="x", expect="one of"),
    case("igbv2", TypeError, weight_heads="x"),
    case("famo", learning_rate=-0.025, expect=">= 0"),
    case("famo", gamma=-0.01, expect=">= 0"),
    case("famo", min_losses=[0.0, INF, 0.0], expect="finite"),
    case("famo", min_losses=[0.0, 0.0], expect="shape"),
    case("famo", eps=0.0, expect="> 0"),
    case("famo", b1=1.0, expect="in [0, 1)"),
    case("famo", b2=1.0, expect="in [0, 1)"),
    case("famo", adam_eps=-1.0, expect=">= 0"),
    case("famo", grads="x", expect="one of"),
    case("famo", TypeError, weight_heads="x"),
    case("stch", mu=0.0, expect="> 0"),
    case("stch", mu=-1.0, expect="> 0"),
    case("stch", mu=jnp.float32(-1.0), expect="> 0"),
    case("stch", warmup_epochs=-1, expect=">= 0"),
    case("stch", steps_per_epoch=0, expect=">= 1"),
    case("stch", nadir=[1.0, 0.0, 1.0], expect="> 0"),
    case("stch", nadir=[1.0, NAN, 1.0], expect="finite"),
    case("stch", eps=0.0, expect="> 0"),
    case("stch", grads="x", expect="one of"),
    case("stch", TypeError, weight_heads="x"),
    # ---- gradient methods
    case("gradnorm", alpha=-0.5, expect=">= 0"),
    case("gradnorm", min_weight=0.0, expect="> 0"),
    case("gradnorm", TypeError, weight_optimizer="adam"),
    case("gradnorm", TypeError, norm_leaves=3),
    case("gradnorm", TypeError, weight_heads="x"),
    case("pcgrad", reduction="max", expect="one of"),
    case("graddrop", leak=1.5, expect="in [0, 1]"),
    case("graddrop", leak=-0.1, expect="in [0, 1]"),
    case("graddrop", leak=[0.1, 0.2, 2.0], expect="in [0, 1]"),
    case("graddrop", leak=[0.1, 0.2], expect="shape"),
    case("graddrop", leak=NAN, expect="finite"),
    case("gradvac", beta=0.0, expect="in (0, 1]"),
    case("gradvac", beta=1.5, expect="in (0, 1]"),
    case("gradvac", beta=-0.1, expect="in (0, 1]"),
    case("gradvac", eps=0.0, expect="> 0"),
    case("gradvac", ema_update="sometimes", expect="one of"),
    case("gradvac", granularity="layer", expect="one of"),
    case("mtadam", b1=1.0, expect="in [0, 1)"),
    case("mtadam", b2=-0.1, expect="in [0, 1)"),
    case("mtadam", b3=1.0, expect="in [0, 1)"),
    case("mtadam", eps=0.0, expect="> 0"),
    case("mtadam", norm_eps=-1.0, expect=">= 0"),
    case("mtadam", ranks=[1.0, -1.0, 1.0], expect=">= 0"),
    case("mtadam", ranks=[1.0, 2.0], expect="shape"),
    case("mtadam", granularity="model", expect="one of"),
    case("metabalance", relax_factor=1.5, expect="in [0, 1]"),
    case("metabalance", relax_factor=-0.1, expect="in [0, 1]"),
    case("metabalance", beta=1.0, expect="in [0, 1)"),
    case("metabalance", beta=-0.1, expect="in [0, 1)"),
    case("metabalance", main_task=T, expect=f"in [0, {T - 1}]"),
    case("metabalance", main_task=-1, expect=f"in [0, {T - 1}]"),
    case("metabalance", TypeError, main_task=0.5),
    case("metabalance", strategy="both", expect="one of"),
    case("metabalance", granularity="tensor", expect="one of"),
    case("moco", beta=0.0, expect="in (0, 1]"),
    case("moco", beta=1.5, expect="in (0, 1]"),
    case("moco", beta_sigma=-0.5, expect=">= 0"),
    case("moco", gamma=-0.1, expect=">= 0"),
    case("moco", gamma_sigma=-1.0, expect=">= 0"),
    case("moco", rho=-1.0, expect=">= 0"),
    case("moco", lambda_update="mirror", expect="one of"),
    case("moco", grad_transform="unit", expect="one of"),
    case("imtl", max_log_scale=0.0, expect="in (0, 88]"),
    case("imtl", max_log_scale=100.0, expect="in (0, 88]"),
    case("imtl", TypeError, scale_optimizer="adam"),
    case("excessmtl", robust_step_size=-0.01, expect=">= 0"),
    case("excessmtl", eps=0.0, expect="> 0"),
    case("excessmtl", TypeError, weight_heads="no"),
]


@pytest.mark.parametrize("method, num_tasks, kw, exc, expect", BAD)
def test_bad_hyperparameter_raises(method, num_tasks, kw, exc, expect):
    (option,) = kw
    with pytest.raises(exc) as info:
        get_method(method, num_tasks, **kw)
    msg = str(info.value)
    assert msg.startswith(f"{method}: "), msg
    assert re.search(rf"\b{option}\b", msg), msg
    if expect is not None:
        assert expect in msg, msg


@pytest.mark.parametrize("method", COVERED)
def test_table_covers_every_hyperparameter(method):
    params = set(inspect.signature(get_factory(method)).parameters) - UNCHECKED
    covered = {option for p in BAD for m, _, kw, _, _ in [p.values] if m == method for option in kw}
    assert params <= covered, f"{method}: no bad-value case for {sorted(params - covered)}"


@pytest.mark.parametrize("name", METHODS)
def test_registry_defaults_build(name):
    for num_tasks in (1, T):
        tx = get_method(name, num_tasks)
        assert isinstance(tx, optax.GradientTransformation)


GOOD = [
    ("uw", dict(learning_rate=0.0, b1=0.0, adam_eps=0.0, weight_decay=0.0, init=jnp.zeros(T))),
    ("imtl_l", dict(learning_rate=jnp.float32(0.1), b2=np.float32(0.99))),
    ("dwa", dict(temperature=1e-3, steps_per_epoch=np.int64(10))),
    ("igbv2", dict(base_epoch=0, start_epoch=0, update_after=0, discount=1.0, tau=1.0, sac_lr=0.0,
                   sac_hidden=[4], buffer_size=1)),
    ("famo", dict(learning_rate=0.0, gamma=0.0, min_losses=np.array([-1.0, 0.0, 2.0]))),
    ("stch", dict(warmup_epochs=0, nadir=jnp.array([1e-3, 1.0, 1e3]), mu=1e-3)),
    ("gradnorm", dict(alpha=0.0, weight_optimizer=optax.sgd(1e-2), norm_leaves=lambda p: True, weight_heads=False)),
    ("graddrop", dict(leak=1.0)),
    ("graddrop", dict(leak=[0.0, 0.5, 1.0])),
    ("gradvac", dict(beta=1.0)),
    ("mtadam", dict(b1=0.0, b3=0.0, norm_eps=0.0, ranks=[0.0, 1.0, 2.0])),
    ("metabalance", dict(relax_factor=0.0, beta=0.0, main_task=T - 1)),
    ("metabalance", dict(relax_factor=1, main_task=np.int32(1))),
    ("moco", dict(beta=1.0, beta_sigma=0.0, gamma=0.0, gamma_sigma=0.0, rho=0.0)),
    ("imtl", dict(max_log_scale=88.0, scale_optimizer=optax.adam(1e-3))),
    ("excessmtl", dict(robust_step_size=0.0, eps=1e-12)),
]


@pytest.mark.parametrize("method, kw", GOOD, ids=[f"{m}-{'-'.join(kw)}" for m, kw in GOOD])
def test_boundary_values_accepted(method, kw):
    get_method(method, T, **kw)


def test_inject_hyperparams_schedules_and_tracers():
    """Concrete arrays (inject_hyperparams at init, a warm-up schedule starting at 0) are checked and
    accepted; traced values (a jitted update re-building the transform) are not checked."""
    p = {"w": jnp.zeros(2)}
    for name, kw in [("uw", dict(learning_rate=optax.linear_schedule(0.0, 1e-2, 10))),
                     ("famo", dict(learning_rate=0.025, gamma=1e-3)),
                     ("gradvac", dict(beta=0.5)),
                     ("moco", dict(gamma=optax.linear_schedule(0.0, 0.1, 10)))]:
        optax.inject_hyperparams(get_factory(name), static_args=("num_tasks",))(num_tasks=T, **kw).init(p)
    with pytest.raises(ValueError, match="uw: learning_rate"):
        optax.inject_hyperparams(get_factory("uw"), static_args=("num_tasks",))(num_tasks=T, learning_rate=-1.0).init(p)
    # a tracer is not validated (its value is unknown at trace time)
    jax.make_jaxpr(lambda b: get_method("gradvac", T, beta=b).init(p))(-1.0)
    jax.make_jaxpr(lambda s: get_method("dwa", T, temperature=s).init(p))(0.0)


@pytest.mark.parametrize("name", [m for m in METHODS if m != "dbmtl"])
def test_inject_hyperparams_with_bfloat16_params_accepts_bfloat16_values(name):
    """inject_hyperparams casts float hyperparameters to the parameters' dtype: bfloat16 scalars are valid
    numbers (NumPy's dtype kind of bfloat16 is 'V', which used to be rejected as "not a number")."""
    floats = {k: jnp.asarray(v.default, jnp.bfloat16)
              for k, v in inspect.signature(get_factory(name)).parameters.items()
              if isinstance(v.default, float)}
    for k, v in floats.items():
        try:
            get_factory(name)(T, **{k: v})
        except ValueError as e:  # only a value that bfloat16 rounded out of range, and then with the hint
            assert "arrived as bfloat16" in str(e) and "hyperparam_dtype=jnp.float32" in str(e), str(e)
            assert k == "b2" and float(np.float32(v)) == 1.0, (k, v)  # Adam's b2 = 0.999 rounds to 1
            floats[k] = jnp.asarray(0.99, jnp.bfloat16)
    get_factory(name)(T, **floats)  # all at once


def test_low_precision_value_out_of_range_names_hyperparam_dtype():
    """float16 flushes eps = 1e-8 to 0 and bfloat16 rounds b2 = 0.999 to 1: the error says why and how."""
    cases = [("gls", jnp.float16, "eps", "got 0.0"), ("stch", jnp.float16, "eps", "got 0.0"),
             ("uw", jnp.bfloat16, "b2", "got 1.0"), ("famo", jnp.bfloat16, "b2", "got 1.0")]
    for name, dt, option, got in cases:
        p = {"w": jnp.ones(2, dt)}
        with pytest.raises(ValueError, match=rf"{name}: {option} must .*{got}; the value arrived as "
                                             rf"{jnp.dtype(dt).name}.*hyperparam_dtype=jnp.float32"):
            optax.inject_hyperparams(get_factory(name), static_args=("num_tasks",))(num_tasks=T).init(p)
        state = optax.inject_hyperparams(get_factory(name), static_args=("num_tasks",),
                                         hyperparam_dtype=jnp.float32)(num_tasks=T).init(p)
        assert state.hyperparams[option].dtype == jnp.float32
    # a float32 value out of range gets no hint
    with pytest.raises(ValueError, match=r"gls: eps must be a finite number > 0, got 0.0\.$"):
        get_method("gls", T, eps=jnp.float32(0.0))


def test_messages_state_the_range():
    with pytest.raises(ValueError, match=re.escape("pcgrad: unknown reduction='max'")):
        get_method("pcgrad", T, reduction="max")
    with pytest.raises(ValueError, match=re.escape("metabalance: beta must be a finite number in [0, 1), got 1.0")):
        get_method("metabalance", T, beta=1.0)
    with pytest.raises(ValueError, match=re.escape("gradvac: beta must be a finite number in (0, 1], got 0.0")):
        get_method("gradvac", T, beta=0.0)
    with pytest.raises(TypeError, match=re.escape("gls: eps must be a finite number > 0, got str 'tiny'")):
        get_method("gls", T, eps="tiny")

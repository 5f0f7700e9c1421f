"""DB-MTL training on a device mesh: data parallel or FSDP-style, unchanged training code.

Run on 8 simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/distributed.py --layout fsdp

* ``--layout data``: the batch is sharded over the mesh, parameters replicated.
* ``--layout fsdp``: parameters, Adam state and the T-stacked DB-MTL EMA are sharded
  along a parameter axis (the EMA keeps its task axis unsharded); the batch is sharded too.

Multi-host: call ``jax.distributed.initialize()`` first on every host (it reads the
coordinator address, process count and id from the cluster environment or from
its arguments), build the mesh over ``jax.devices()`` (all hosts' devices), and feed
each host its slice of the global batch with
``jax.make_array_from_process_local_data``.  Nothing else changes.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dbmtl_jax
from dbmtl_jax.datasets import load_adult


def init_params(key, d_in, hidden, num_tasks):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "trunk": {
            "w1": jax.random.normal(k1, (d_in, hidden)) * np.sqrt(2 / d_in),
            "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, hidden)) * np.sqrt(2 / hidden),
            "b2": jnp.zeros(hidden),
        },
        "heads": {"w": jax.random.normal(k3, (hidden, num_tasks)) * 0.01, "b": jnp.zeros(num_tasks)},
    }


def param_specs(layout):
    if layout == "data":
        return jax.tree.map(lambda _: P(), init_params(jax.random.key(0), 1, 8, 1))
    return {
        "trunk": {"w1": P(None, "devices"), "b1": P("devices"), "w2": P("devices", None), "b2": P()},
        "heads": {"w": P("devices", None), "b": P()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", choices=["data", "fsdp"], default="data")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=128)
    args = ap.parse_args()

    data = load_adult()
    n_dev = jax.device_count()
    mesh = jax.make_mesh((n_dev,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
    print(f"{n_dev} devices, layout={args.layout}")

    is_bce = jnp.asarray([t.loss == "bce" for t in data.tasks])
    shard = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(args.layout), is_leaf=lambda s: isinstance(s, P))
    params = jax.device_put(init_params(jax.random.key(0), data.x_train.shape[1], args.hidden, data.num_tasks), shard)
    tx = optax.chain(
        dbmtl_jax.dbmtl(data.num_tasks, shared=lambda path: path.startswith("trunk")), optax.adam(3e-4)
    )
    opt_state = tx.init(params)  # EMA inherits each parameter's sharding, task axis unsharded
    state_sharding = jax.tree.map(
        lambda a: a.sharding if isinstance(a.sharding, NamedSharding) else NamedSharding(mesh, P()), opt_state
    )
    batch_sharding = NamedSharding(mesh, P("devices"))

    def task_losses(p, x, y):
        z = jax.nn.relu(x @ p["trunk"]["w1"] + p["trunk"]["b1"])
        z = jax.nn.relu(z @ p["trunk"]["w2"] + p["trunk"]["b2"])
        out = z @ p["heads"]["w"] + p["heads"]["b"]
        bce = jnp.mean(optax.sigmoid_binary_cross_entropy(out, y), axis=0)
        mse = jnp.mean((out - y) ** 2, axis=0)
        return jnp.where(is_bce, bce, mse)

    @jax.jit
    def step(p, s, x, y):
        losses, grads = dbmtl_jax.value_and_task_grads(task_losses)(p, x, y)
        u, s = tx.update(grads, s, p)
        return optax.apply_updates(p, u), s, losses

    step = jax.jit(step, out_shardings=(shard, state_sharding, NamedSharding(mesh, P())), donate_argnums=(0, 1))
    rng = np.random.default_rng(0)
    n = data.x_train.shape[0] - data.x_train.shape[0] % args.batch_size
    t0 = time.perf_counter()
    for i in range(args.steps):
        idx = rng.integers(0, n, args.batch_size)
        x = jax.device_put(data.x_train[idx], batch_sharding)
        y = jax.device_put(data.y_train[idx], batch_sharding)
        params, opt_state, losses = step(params, opt_state, x, y)
        if i % 100 == 0 or i == args.steps - 1:
            print(f"step {i:4d} losses {np.array2string(np.asarray(losses), precision=3)}")
    jax.block_until_ready(params)
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f}s")
    ema = opt_state[0].ema["trunk"]["w1"]
    print(f"EMA of trunk/w1: shape {ema.shape}, sharding {ema.sharding.spec}")


if __name__ == "__main__":
    main()

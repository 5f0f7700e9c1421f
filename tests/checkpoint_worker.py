"""Run by tests/test_checkpoint.py in fresh processes: train, save with Orbax, restore, resume.

Usage: python checkpoint_worker.py METHODS MODE DIR N   (METHODS: comma-separated registry names)
  MODE=straight: N steps, write DIR/<method>/straight.npz
  MODE=first:    N/2 steps, save the whole train state to DIR/<method>/ckpt
  MODE=first+straight: both of the above in one process (save at N/2, go on to N)
  MODE=resume:   restore DIR/<method>/ckpt into a freshly built state, N/2 more steps,
                 write DIR/<method>/resumed.npz
The train state holds parameters, the optimizer state (method state + Adam), the
PRNG key and the data position (the step index that picks the next batch).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import dbmtl_jax

T = 3


def batch(step):
    k = jax.random.fold_in(jax.random.key(123), step)
    kx, ky = jax.random.split(k)
    x = jax.random.normal(kx, (32, 5))
    y = jax.random.normal(ky, (32, T)) * jnp.array([1.0, 20.0, 0.05])
    return x, y


def init_params():
    k1, k2 = jax.random.split(jax.random.key(7))
    return {"trunk": {"w": jax.random.normal(k1, (5, 8)) * 0.3}, "head": {"w": jax.random.normal(k2, (8, T)) * 0.3}}


def losses_fn(p, x, y):
    z = jnp.tanh(x @ p["trunk"]["w"])
    return jnp.mean((z @ p["head"]["w"] - y) ** 2, axis=0)


def build(method):
    mtx = dbmtl_jax.get_method(method, T, shared=lambda p: p.startswith("trunk"))
    tx = optax.chain(mtx, optax.adam(1e-2))
    params = init_params()
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "key": jax.random.key_data(jax.random.key(0)),
        "data_position": jnp.asarray(0, jnp.int32),
    }

    @jax.jit
    def step(s):
        x, y = batch(s["data_position"])
        key, sub = jax.random.split(jax.random.wrap_key_data(s["key"]))
        losses, g = dbmtl_jax.value_and_task_grads(losses_fn)(s["params"], x, y)
        u, opt_state = tx.update(g, s["opt_state"], s["params"], losses=losses, key=sub)
        return {
            "params": optax.apply_updates(s["params"], u),
            "opt_state": opt_state,
            "key": jax.random.key_data(key),
            "data_position": s["data_position"] + 1,
        }

    return state, step


def save_npz(path, state):
    leaves = jax.tree.leaves(state)
    np.savez(path, *[np.asarray(x) for x in leaves])


def main(method, mode, directory, n):
    state, step = build(method)
    if mode == "straight":
        for _ in range(n):
            state = step(state)
        save_npz(os.path.join(directory, "straight.npz"), state)
    elif mode == "first":
        for _ in range(n // 2):
            state = step(state)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(directory, "ckpt"), state)
    elif mode == "first+straight":  # one process: save at N/2, then go on straight to N
        for _ in range(n // 2):
            state = step(state)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(directory, "ckpt"), state)
        for _ in range(n - n // 2):
            state = step(state)
        save_npz(os.path.join(directory, "straight.npz"), state)
    elif mode == "resume":
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        with ocp.StandardCheckpointer() as ckpt:
            state = ckpt.restore(os.path.join(directory, "ckpt"), abstract)
        assert int(state["data_position"]) == n // 2
        for _ in range(n - n // 2):
            state = step(state)
        save_npz(os.path.join(directory, "resumed.npz"), state)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    for name in sys.argv[1].split(","):
        d = os.path.join(sys.argv[3], name)
        os.makedirs(d, exist_ok=True)
        main(name, sys.argv[2], d, int(sys.argv[4]))

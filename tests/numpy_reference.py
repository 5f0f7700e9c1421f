"""An independent NumPy implementation of DB-MTL (Lin et al., Algorithm 1), for the tests.

Gradients are given as a list (over steps) of dicts name -> [T, *shape] arrays;
``shared`` names the shared leaves.  Everything is float64.
"""

from __future__ import annotations

import numpy as np


class NumpyDBMTL:
    # Defaults mirror dbmtl_jax.dbmtl's (β_k = 0.9 / k^0.5 since 0.2.0; LibMTL's setting is beta_sigma=0.0).
    def __init__(self, num_tasks, beta=0.9, beta_sigma=0.5, alpha="max", eps=1e-8, shared=None):
        self.T = num_tasks
        self.beta, self.sigma, self.alpha, self.eps = beta, beta_sigma, alpha, eps
        self.shared = shared
        self.ema = None
        self.k = 0

    def step(self, grads: dict) -> dict:
        names = sorted(grads)
        shared = [n for n in names if self.shared is None or n in self.shared]
        heads = [n for n in names if n not in shared]
        if self.ema is None:
            self.ema = {n: np.zeros_like(grads[n], dtype=np.float64) for n in shared}
        self.k += 1
        b = self.beta / self.k**self.sigma
        for n in shared:
            self.ema[n] = b * self.ema[n] + (1.0 - b) * np.asarray(grads[n], np.float64)
        # one long vector per task over all shared leaves
        flat = np.concatenate([self.ema[n].reshape(self.T, -1) for n in shared] + [np.zeros((self.T, 0))], axis=1)
        norms = np.sqrt((flat**2).sum(axis=1))
        if isinstance(self.alpha, str):
            a = {"max": np.max, "min": np.min, "mean": np.mean, "median": np.median}[self.alpha](norms)
        else:
            a = float(self.alpha)
        out = {}
        for n in shared:
            acc = np.zeros(self.ema[n].shape[1:])
            for t in range(self.T):
                acc += self.ema[n][t] / (norms[t] + self.eps)
            out[n] = a * acc
        for n in heads:
            out[n] = np.asarray(grads[n], np.float64).sum(axis=0)
        return out

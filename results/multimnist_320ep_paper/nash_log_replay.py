"""Nash-MTL with and without the log transform, replayed side by side on multimnist (§34 of results/README.md).

Nash-MTL's update is invariant to a per-task rescaling of the gradients (its weights α_t scale inversely), and
``∇ log(ℓ_t + ε) = ∇ℓ_t / (ℓ_t + ε)`` is such a rescaling, so ``nash_mtl`` and ``nash_mtl+log`` are one algorithm up to
float rounding.  This replays both runs of ``bash results/run_study.sh multimnist320 paper`` (320 quick epochs,
Adam 1e-3 decayed to 0 by cosine; same seed, initialisation and batches) for their first STEPS steps and prints,
at a few steps, the largest parameter difference and both runs' task losses: equal to rounding at first, then
apart as any two reruns drift.

    python results/multimnist_320ep_paper/nash_log_replay.py [SEED] [STEPS] > nash_log_replay.md
"""

from __future__ import annotations

import itertools
import sys

import numpy as np


def main(seed: int = 0, steps: int = 400) -> None:
    import jax

    from dbmtl_jax import experiments as ex

    bench = ex.get_benchmark("multimnist")
    recipe = bench.quick.replace(epochs=320, lr_schedule="cosine")
    runs = [ex.replay_steps(bench, m, recipe, seed) for m in ("nash_mtl", "nash_mtl+log")]
    shown = {1, 10, 50, 100, 150, 200, 300, 400, steps}
    print(f"# Nash-MTL and Nash-MTL + log replayed side by side (multimnist, seed {seed}, first {steps} steps)\n")
    print("Made by `python results/multimnist_320ep_paper/nash_log_replay.py "
          f"{seed} {steps}` (§34 of results/README.md).\n")
    print("| step | largest absolute parameter difference | task losses, Nash-MTL | task losses, Nash-MTL + log |")
    print("|---|---|---|---|")
    for a, b in itertools.islice(zip(*runs), steps):
        if a.step not in shown:
            continue
        diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                   for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)))
        la, lb = (" / ".join(f"{v:.5f}" for v in np.asarray(s.losses)) for s in (a, b))
        print(f"| {a.step} | {diff:.2g} | {la} | {lb} |")


if __name__ == "__main__":
    main(*(int(v) for v in sys.argv[1:3]))

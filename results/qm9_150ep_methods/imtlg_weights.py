"""IMTL-G's task weights on qm9, epoch by epoch (§35 of results/README.md): why its seeds disagree.

IMTL-G (Liu et al., 2021) solves, at every step, for weights ``α`` (``Σ α_t = 1``, sign unconstrained) that give
the combined gradient equal projections on every task's unit gradient.  The system is solved exactly, but when the
tasks' unit gradients are nearly linearly dependent it is ill-conditioned and ``α`` can hold large weights of
opposite sign.  This script replays the runs of ``bash results/run_study.sh qm9_2k methods`` for IMTL-G (2,000
training molecules, 2,000 validation and test, batch 64, 150 epochs, Adam 1e-3 decayed to 0 by cosine; same seed,
init and batch order as the records) and keeps, for every epoch, the mean training losses and the extremes of
``IMTLGState.weights`` over the epoch's steps; the page compares the losses with each run's record (a replay
follows its record only through epoch 1: IMTL-G's solve amplifies float rounding, see the page).

    python results/qm9_150ep_methods/imtlg_weights.py run SEED OUT.npz [STOP [LABEL]]   (STOP: the last epoch traced;
        LABEL: how the replay was run, e.g. "taskset -c 1", printed beside the seed)
    python results/qm9_150ep_methods/imtlg_weights.py losses METHOD SEED OUT.npz STOP [LABEL]   (a control: only the
        epochs' mean training losses of another method's replay, e.g. dbmtl once plain and once with LABEL)
    python results/qm9_150ep_methods/imtlg_weights.py page OUT.npz [OUT.npz ...] > imtlg_weights.md

The committed page was made from ``imtlg_weights/*.npz`` (``run S imtlg_weights/imtlg_seedS.npz 40`` for seeds 0-4
on two cores, ``run 0 imtlg_weights/imtlg_seed0_one_core.npz 10 "taskset -c 1"`` under ``taskset -c 1``, and the
controls ``losses dbmtl|ew 0 imtlg_weights/control_M_seed0[_one_core].npz 5 [LABEL]``; tcmalloc preloaded).
"""

from __future__ import annotations

import gzip
import itertools
import json
import sys
from pathlib import Path

import numpy as np

STUDY = Path(__file__).resolve().parent


def _recipe(bench):
    return bench.recipe.replace(epochs=150, batch_size=64, max_train_examples=2000, max_eval_examples=2000,
                                lr_schedule="cosine", lr_decay_epoch=None)


def run(seed: int, out: str, stop: int = 150, label: str = "") -> None:
    from optax.tree_utils import tree_get

    from dbmtl_jax import experiments as ex

    bench = ex.get_benchmark("qm9")
    rec: dict[str, list] = {"losses": [], "w_min": [], "w_max": [], "abs_mean": [], "residual": [], "big": []}
    for epoch, steps in itertools.groupby(ex.replay_steps(bench, "imtl_g", _recipe(bench), seed),
                                          key=lambda s: s.epoch):
        if epoch > stop:  # the schedule still spans 150 epochs
            break
        w, losses, res = [], [], []
        for s in steps:  # IMTLGState's fields
            w.append(np.asarray(tree_get(s.opt_state, "weights")))
            res.append(float(tree_get(s.opt_state, "residual")))
            losses.append(np.asarray(s.losses))
        w = np.stack(w)
        rec["losses"].append(np.mean(losses, axis=0))
        rec["w_min"].append(w.min())
        rec["w_max"].append(w.max())
        rec["abs_mean"].append(np.abs(w).mean())
        rec["residual"].append(max(res))
        rec["big"].append(np.mean(np.abs(w).max(axis=1) > 2.0))  # share of the epoch's steps with some |α_t| > 2
        print(f"seed {seed} epoch {epoch}: loss {rec['losses'][-1].sum():.4f} α in [{w.min():+.2f}, {w.max():+.2f}]",
              flush=True)
    np.savez_compressed(out, seed=seed, label=label, **{k: np.asarray(v) for k, v in rec.items()})


def losses(method: str, seed: int, out: str, stop: int, label: str = "") -> None:
    from dbmtl_jax import experiments as ex

    bench = ex.get_benchmark("qm9")
    rec = []
    for epoch, steps in itertools.groupby(ex.replay_steps(bench, method, _recipe(bench), seed), key=lambda s: s.epoch):
        if epoch > stop:
            break
        rec.append(np.mean([np.asarray(s.losses) for s in steps], axis=0))
    np.savez_compressed(out, seed=seed, label=label, method=method, losses=np.asarray(rec))


def _record(seed: int) -> dict:
    (path,) = [STUDY / line.strip() for line in (STUDY / "runs.txt").read_text().splitlines()
               if f"__imtl_g__seed{seed}__" in line]
    return json.load(gzip.open(path))


def page(paths: list[str]) -> str:
    rows, drift, reruns, first = [], [], [], {}
    for p in paths:
        d = np.load(p)
        seed, label, L = int(d["seed"]), str(d["label"]) if "label" in d else "", d["losses"]
        method = str(d["method"]) if "method" in d else "imtl_g"
        n = len(L)
        if label:  # a second replay of a seed, run otherwise (e.g. on one core): compared with the first
            reruns.append((method, seed, label, L))
            continue
        first[method, seed] = L
        if method != "imtl_g":  # a control's plain replay
            continue
        ref = np.asarray(_record(seed)["history"]["train_loss"])
        rel = np.max(np.abs(L - ref[:n]) / np.abs(ref[:n]), axis=1)
        drift.append(f"seed {seed}: {rel[0]:.1e}, {rel[1]:.2f}, {rel[4]:.2f}, {rel[-1]:.2f}")
        amax = np.maximum(-d["w_min"], d["w_max"])
        spikes = [str(e + 1) for e in np.flatnonzero(amax > 3.0)]
        rows.append((L[-1].sum(), f"| {seed} | {amax[:5].max():.2f} | "
                     f"{amax.max():.2f} (epoch {int(np.argmax(amax)) + 1}) | {', '.join(spikes) or '—'} | "
                     f"{100 * d['big'].mean():.1f} | {d['residual'].max():.0e} | {L[4].sum():.3f} | "
                     f"**{L[-1].sum():.3f}** | {ref[n - 1].sum():.3f} | {ref[-1].sum():.3f} |"))
    n = max(len(L) for (method, _), L in first.items() if method == "imtl_g")
    again = []
    for method, seed, label, L in reruns:
        ref = first[method, seed]
        m = min(len(L), len(ref))
        rel = np.max(np.abs(L[:m] - ref[:m]) / np.abs(ref[:m]), axis=1)
        at = sorted({1, 2, 3, 5, m} & set(range(1, m + 1)))
        again.append(f"{'IMTL-G' if method == 'imtl_g' else method} seed {seed} replayed with `{label}` and without, "
                     f"epochs {', '.join(map(str, at))}: {', '.join(f'{rel[e - 1]:.2g}' for e in at)}")
    lines = [
        "# IMTL-G's task weights on qm9: replays of five seeds",
        "",
        "Generated by `imtlg_weights.py page`; see §35 of results/README.md.  α: IMTL-G's task weights (they sum",
        "to 1; EW's direction would be 1/11 ≈ 0.09 each).  max |α|: the largest weight in magnitude over every step",
        f"of the epochs named; spikes: epochs (of the {n} replayed) with some |α_t| > 3; |α| > 2: the share of steps",
        "with some weight above 2 in magnitude; residual: the largest relative spread of the projections (0: the",
        "equal-projection system solved exactly).  Losses: the summed training loss (11 tasks, normalised targets),",
        f"the epoch's mean, of the replay (epochs 5 and {n}) and of the run's record (epochs {n} and 150).  Rows by",
        f"the replay's loss at epoch {n}.",
        "",
        f"| seed | max \\|α\\|, epochs 1–5 | max \\|α\\|, epochs 1–{n} | spikes (\\|α\\| > 3) | \\|α\\| > 2, % of "
        f"steps | residual | replay loss, epoch 5 | replay loss, epoch {n} | record loss, epoch {n} | record loss, "
        "epoch 150 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[r for _, r in sorted(rows)],
        "",
        "**The replays are not the records' runs after epoch 1.**  Largest relative difference of a task's training",
        f"loss between replay and record at epochs 1, 2, 5 and {n}: " + "; ".join(drift) + ".  At epoch 1 the",
        "difference is the records' 4-significant-digit rounding; from epoch 2 on the trajectories part.  Two replays",
        "of one seed part as well, IMTL-G's fastest but the controls' too (same seed, initialisation and batches; only",
        "the float rounding of another thread count differs; largest relative difference of a task's loss): "
        + ("; ".join(again) or "none run") + ".  So on qm9 no run is reproducible beyond rounding after a few epochs,",
        "whatever the method; what sets IMTL-G apart is how far apart its trajectories end.  A row relates a replay's",
        "weights to that replay's own losses; its last two columns are the recorded run of the same seed, another",
        "trajectory.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(int(sys.argv[2]), sys.argv[3], *(int(a) for a in sys.argv[4:5]), *sys.argv[5:6])
    elif sys.argv[1] == "losses":
        losses(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), *sys.argv[6:7])
    elif sys.argv[1] == "page":
        print(page(sys.argv[2:]))
    else:
        raise SystemExit(__doc__)

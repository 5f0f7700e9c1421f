"""Writes ``RESULTS.md`` from the results dictionary that ``run.py`` collects."""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["write_report", "render"]

MiB = 2**20
LIB_STRATEGIES = ("vmap", "jacrev", "loop", "chunk@4")  # value_and_task_grads(loss_fn); jacrev: recorded results only
TRUNK_STRATEGIES = ("trunk-vmap", "trunk-loop", "trunk-chunk@4")  # value_and_task_grads(TrunkHeads(...))
FUSED_SUBJECTS = ("fused@1", "fused-inplace@1", "fused-inplace@2", "fused-inplace@4", "fused-unroll@1")


def _fmt(x: Optional[float], spec: str = ".1f", none: str = "—") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _ms(g: dict, name: str) -> Optional[float]:
    v = g["variants"].get(name)
    return None if v is None else v.get("median_ms")


def _subjects(groups: list) -> list:
    seen: list = []
    for g in sorted(groups, key=lambda g: -len(g["variants"]) - len(g.get("skipped", {}))):
        for name in g["variants"]:
            if name not in seen:
                seen.append(name)
        for name in g.get("skipped", {}):
            if f"jax:{name}" not in seen:
                seen.append(f"jax:{name}")
    return seen


def _floor(g: dict) -> Optional[float]:
    """Smallest FLOP count of a complete DB-MTL step (no while loop) / EW's."""
    ew = g["variants"].get("jax:ew", {}).get("flops")
    cands = [
        v["flops"]
        for k, v in g["variants"].items()
        if k.startswith("jax:") and k not in ("jax:ew", "jax:transform-only") and not k.startswith("jax:sum:")
        and v.get("flops") and not v.get("while_loop")
    ]
    if not ew or not cands:
        return None
    return min(cands) / ew


def efficiency(g: dict, name: str) -> Optional[float]:
    fl, ew, t = _floor(g), _ms(g, "jax:ew"), _ms(g, name)
    if None in (fl, ew, t) or not t:
        return None
    return ew * fl / t


def transient_p(g: dict, name: str) -> Optional[float]:
    """(peak − params − optimizer/EMA state − batch) in units of P shared floats."""
    v = g["variants"].get(name, {})
    mem = v.get("memory")
    if not mem or "state_bytes" not in v:
        return None
    return (mem["peak"] - v["state_bytes"] - v["batch_bytes"]) / (4 * g["P_shared"])


def _table(header: list, rows: list) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _by_problem(groups: list) -> dict:
    out: dict = {}
    for g in groups:
        out.setdefault(g["problem"], []).append(g)
    return out


def _cell_skip(g: dict, name: str) -> str:
    short = name[4:] if name.startswith("jax:") else name
    return "skip" if short in g.get("skipped", {}) else "—"


def _best(g: dict, names: tuple) -> tuple:
    cands = [(g["variants"][f"jax:{n}"]["median_ms"], n) for n in names if f"jax:{n}" in g["variants"]]
    return min(cands) if cands else (None, None)


def render(results: dict) -> str:
    meta, groups = results["meta"], results["groups"]
    v = meta["versions"]
    lines = [
        "# Benchmark results: per-task-gradient DB-MTL steps",
        "",
        f"- **Command:** `{meta['command']}`  (wall time {meta.get('wall_s', 0):.0f} s)",
        f"- **Date:** {meta['date']}   **git:** {meta['git']}",
        f"- **Machine:** {meta['cpu']}, {meta['cpus_total']} CPUs, {meta['mem_gib']:.0f} GiB; "
        f"**threads for every subject:** {meta['threads']} (process pinned to {meta['threads']} CPU(s); "
        f"`torch.set_num_threads({meta['threads']})`)",
        f"- **Versions:** Python {meta['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, optax {v['optax']}, "
        f"numpy {v['numpy']}, torch {v['torch']}",
        f"- **Memory allocator (all subjects, PyTorch included):** {meta.get('allocator', 'glibc malloc (default)')}",
        f"- **Load average (1/5/15 min):** start {meta['load_start']}, end {meta.get('load_end', '?')}. "
        "The machine is shared; a load above the thread count means other processes competed for the cores "
        "and absolute times are inflated (interleaving keeps the ratios comparable).",
        f"- **Streaming bandwidth through XLA** (`0.9·y + 0.1·x`, {meta['bandwidth']['floats'] // 2**20} Mi floats): "
        f"{meta['bandwidth']['gbs']:.1f} GB/s",
        f"- **Timing:** median over {meta['reps']} interleaved repetitions (round-robin over all subjects of a "
        "group, order rotated each repetition; each repetition times a block of steps lasting ≈0.1 s; "
        "subjects slower than 8 s in total stop after 3 repetitions). float32 everywhere; params and optimizer "
        "state donated to the jitted step.",
        "",
        "Subjects: `jax:ew` = EW + Adam (one backward of Σℓ_t); `jax:<strategy>` = DB-MTL + Adam with "
        "`value_and_task_grads(strategy=...)` (`vmap`, `jacrev`, `loop`; `chunk@c` = vmap in chunks of c "
        "via `lax.map`); `jax:trunk-<strategy>` = `trunk_heads_task_grads` (every head differentiated once, "
        "trunk pulled back per task); `jax:fused@c` = the library's fused step `fused_trunk_heads_dbmtl` "
        "(trunk-once gradients streamed c tasks at a time into the EMA, then Adam; exact guard: a copy of the EMA "
        "is kept to restore it on a rejected step; task loop unrolled automatically for convolutions on CPU); "
        "`jax:fused-inplace@c` = the same with `in_place=True` (EMA rows written into the donated state); "
        "`jax:sum:fused@c` = the same streamed trunk gradients summed (no EMA); `jax:sum:<s>` = the same gradients summed "
        "instead of DB-MTL (transform cost); `jax:transform-only` = the `dbmtl` transform alone on "
        "precomputed gradients; `torch:dbmtl` = LibMTL's DB-MTL procedure (T backward passes with "
        "`retain_graph`, flattened shared gradients, EMA, max-norm rescale, Adam); `torch:ew` = Σℓ_t backward "
        "+ Adam. `skip` = not run (reason below the table).",
        "",
        "Where the time goes (profiles, optimized HLO), what limits the targets that are not met, and the "
        "recommended default strategy: `benchmarks/README.md`.",
        "",
    ]
    for prob, gs in _by_problem(groups).items():
        gs = sorted(gs, key=lambda g: g["T"])
        ts = [g["T"] for g in gs]
        lines += [f"## Problem `{prob}`", ""]
        p = gs[0]["P_shared"]
        lines += [f"P (shared) = {p:,}; total parameters at T={ts[0]}: {gs[0]['P_total']:,}. "
                  "Load average per group: " + "; ".join(f"T={g['T']}: {g['load_before']} → {g['load_after']}" for g in gs), ""]
        subjects = _subjects(gs)
        # 1. step time
        lines += ["### 1. Step time (ms, median; IQR in brackets)", ""]
        rows = []
        for s in subjects:
            row = [f"`{s}`"]
            for g in gs:
                e = g["variants"].get(s)
                if e is None:
                    row.append(_cell_skip(g, s))
                else:
                    lo, hi = e.get("iqr_ms", (None, None))
                    row.append(f"{_fmt(e['median_ms'], '.2f')} [{_fmt(lo, '.1f')}–{_fmt(hi, '.1f')}]")
            rows.append(row)
        lines += _table(["subject"] + [f"T={t}" for t in ts], rows) + [""]
        skipped = {k: r for g in gs for k, r in g.get("skipped", {}).items()}
        if skipped:
            lines += ["Skipped: " + "; ".join(f"`{k}`: {r}" for k, r in skipped.items()), ""]
        # 2. FLOPs and efficiency
        lines += ["### 2. FLOP floor and efficiency", "",
                  "FLOP ratio = cost(step)/cost(EW step) from `compiled.cost_analysis()`. Floor = the smallest ratio "
                  "of a complete DB-MTL step without a while loop (XLA counts a while body once, so chunked/fused "
                  "FLOPs are marked `loop`). Efficiency = (EW time × floor) / time; ≥ 1 means faster than "
                  "EW scaled by the FLOP floor.", ""]
        rows = [["floor ratio"] + [_fmt(_floor(g), ".2f") for g in gs]]
        for s in subjects:
            if not s.startswith("jax:") or s in ("jax:ew", "jax:transform-only"):
                continue
            row = [f"`{s}`"]
            for g in gs:
                e = g["variants"].get(s)
                ew = g["variants"].get("jax:ew", {}).get("flops")
                if e is None:
                    row.append(_cell_skip(g, s))
                    continue
                ratio = "loop" if e.get("while_loop") else _fmt(e["flops"] / ew if e.get("flops") and ew else None, ".2f")
                row.append(f"{ratio} / {_fmt(efficiency(g, s), '.2f')}")
            rows.append(row)
        lines += _table(["subject (FLOP ratio / efficiency)"] + [f"T={t}" for t in ts], rows) + [""]
        # 3. vs PyTorch
        if any("torch:dbmtl" in g["variants"] for g in gs):
            lines += ["### 3. DB-MTL step time relative to the LibMTL-style PyTorch step", ""]
            rows = [["`torch:dbmtl` (ms)"] + [_fmt(_ms(g, "torch:dbmtl"), ".1f") for g in gs],
                    ["`torch:ew` (ms)"] + [_fmt(_ms(g, "torch:ew"), ".1f") for g in gs]]
            for s in subjects:
                if not s.startswith("jax:") or s in ("jax:transform-only",) or s.startswith("jax:sum:"):
                    continue
                row = [f"`{s}`"]
                for g in gs:
                    t, ref = _ms(g, s), _ms(g, "torch:dbmtl")
                    row.append(_fmt(t / ref if t and ref else None, ".2f") if s in g["variants"] else _cell_skip(g, s))
                rows.append(row)
            lines += _table(["time / torch:dbmtl"] + [f"T={t}" for t in ts], rows) + [""]
        else:
            lines += ["### 3. PyTorch", "", "PyTorch rows skipped (torch not installed or `--no-torch`).", ""]
        # 4. memory
        lines += ["### 4. Peak memory", "",
                  "XLA: `compiled.memory_analysis()`, peak = arguments + temporaries + non-aliased outputs. Lower bound "
                  "= params + Adam state (+ T×P EMA for DB-MTL) = the donated state. Transient = (peak − state − batch) "
                  "in units of P shared float32s. PyTorch (subprocess): lower bound = bytes of params, grads, Adam state "
                  "and the EMA buffer; transient = RSS high-water mark over 2 steps (reset after a warm-up step) "
                  "minus the RSS before them; peak = lower bound + transient.", ""]
        rows = []
        for s in subjects:
            if not s.startswith("jax:") or s == "jax:transform-only":
                continue
            row = [f"`{s}`"]
            for g in gs:
                e = g["variants"].get(s)
                if e is None or not e.get("memory"):
                    row.append(_cell_skip(g, s))
                    continue
                row.append(f"{e['memory']['peak'] / MiB:.1f} / {e['state_bytes'] / MiB:.1f} / {_fmt(transient_p(g, s), '.2f')}")
            rows.append(row)
        rr = ["`torch:dbmtl` (RSS)"]
        for g in gs:
            r = g.get("torch_rss") or {}
            if "hwm_kib" in r and r.get("hwm_reset"):
                trans = max(r["hwm_kib"] - r["rss_before_kib"], 0) * 1024
                pers = r["persistent_bytes"]
                rr.append(f"{(pers + trans) / MiB:.1f} / {pers / MiB:.1f} / {trans / (4 * g['P_shared']):.2f}")
            else:
                rr.append("—")
        rows.append(rr)
        lines += _table(["subject (peak MiB / lower bound MiB / transient ×P)"] + [f"T={t}" for t in ts], rows) + [""]
        # 5. compile time
        lines += ["### 5. Compile time (s, `jit(...).lower(...).compile()`)", ""]
        rows = []
        for s in subjects:
            if not s.startswith("jax:") or s == "jax:transform-only":
                continue
            rows.append([f"`{s}`"] + [
                _fmt(g["variants"][s].get("compile_s"), ".2f") if s in g["variants"] else _cell_skip(g, s) for g in gs
            ])
        lines += _table(["subject"] + [f"T={t}" for t in ts], rows) + [""]
        # 6. head backward
        if any(g.get("head_backward") for g in gs):
            lines += ["### 6. Head-backward FLOPs", "",
                      "cost(per-task grads) − cost(trunk fwd) − T·cost(one trunk backward) − cost(heads fwd), divided by "
                      "one backward of every head (cost(heads fwd+bwd) − cost(heads fwd)). 1.0 = every head "
                      "back-propagated once; T = every head back-propagated for every task.", ""]
            names = []
            for g in gs:
                for k in (g.get("head_backward") or {}):
                    if k != "baseline" and k not in names:
                        names.append(k)
            rows = [["one backward per head (MFLOP)"] + [
                _fmt((g.get("head_backward") or {}).get("baseline", None) and g["head_backward"]["baseline"] / 1e6, ".1f")
                for g in gs]]
            for n in names:
                row = [f"`{n}`"]
                for g in gs:
                    hb = (g.get("head_backward") or {}).get(n)
                    row.append(_fmt(hb[1], ".2f") if hb else "—")
                rows.append(row)
            lines += _table(["strategy (head backward / one per head)"] + [f"T={t}" for t in ts], rows) + [""]
        # 7. transform cost
        lines += ["### 7. Cost of the DB-MTL transform itself (EMA, norms, scaling)", "",
                  "`transform-only` runs `dbmtl(T).update` alone on precomputed gradients (donated state); the "
                  "marginal cost is the step time of `trunk-loop` minus the same gradients summed (`sum:trunk-loop`).",
                  ""]
        rows = []
        bw = (meta.get("bandwidth") or {}).get("gbs")
        for g in gs:
            tr = _ms(g, "jax:transform-only")
            a, b = _ms(g, "jax:trunk-loop"), _ms(g, "jax:sum:trunk-loop")
            fa, fb = _ms(g, "jax:fused-inplace@1"), _ms(g, "jax:sum:fused@1")
            best_t, best_n = _best(g, LIB_STRATEGIES + TRUNK_STRATEGIES)
            floor_ms = 12 * g["T"] * g["P_shared"] / (bw * 1e9) * 1e3 if bw else None
            rows.append([
                f"T={g['T']}", _fmt(tr, ".2f"), f"{_fmt(best_t, '.2f')} (`{best_n}`)",
                _fmt(100 * tr / best_t if tr and best_t else None, ".1f"),
                _fmt(100 * (a - b) / a if a and b else None, ".1f"),
                _fmt(100 * (fa - fb) / fa if fa and fb else None, ".1f"),
                _fmt(100 * floor_ms / fa if floor_ms and fa else None, ".1f"),
            ])
        lines += _table(["T", "transform alone (ms)", "fastest library DB-MTL step (ms)", "alone / that step (%)",
                         "(trunk-loop − sum:trunk-loop) / trunk-loop (%)",
                         "(fused-inplace@1 − sum:fused@1) / fused-inplace@1 (%)",
                         "bandwidth floor 12·T·P bytes / fused-inplace@1 (%)"], rows) + [""]
        lines += ["The bandwidth floor is the least memory traffic of the transform on top of the gradients (read and "
                  "write the T×P float32 EMA, read it once more for the weighted sum) at the measured streaming "
                  "bandwidth: no implementation that keeps a T×P EMA in memory can spend less.", ""]
        # recommendation
        lines += ["### Fastest strategies", ""]
        rows = []
        for g in gs:
            lt, ln = _best(g, LIB_STRATEGIES)
            tt, tn = _best(g, TRUNK_STRATEGIES)
            ft, fn = _best(g, tuple(k[4:] for k in g["variants"] if k.startswith("jax:fused")))
            rows.append([f"T={g['T']}", f"`{ln}` {_fmt(lt, '.2f')}", f"`{tn}` {_fmt(tt, '.2f')}", f"`{fn}` {_fmt(ft, '.2f')}"])
        lines += _table(["T", "value_and_task_grads (ms)", "trunk_heads_task_grads (ms)", "fused (ms)"], rows) + [""]
    lines += targets_section(groups)
    return "\n".join(lines) + "\n"


def targets_section(groups: list) -> list:
    """The issue's targets, each with the measured value (computed from this run)."""
    by = {(g["problem"], g["T"]): g for g in groups}
    rows = []

    def verdict(ok: Optional[bool]) -> str:
        return "n/a" if ok is None else ("met" if ok else "**not met**")

    def best_lib(g: dict) -> tuple:
        return _best(g, LIB_STRATEGIES + TRUNK_STRATEGIES)

    for t in (3, 10):
        g = by.get(("mlp", t))
        if not g:
            continue
        for label, names in (("library", LIB_STRATEGIES + TRUNK_STRATEGIES), ("fused", FUSED_SUBJECTS)):
            bt, bn = _best(g, names)
            if bn is None:
                continue
            e = efficiency(g, f"jax:{bn}")
            rows.append([f"MLP T={t}: efficiency ≥ 0.9 of the FLOP floor ({label})", f"`{bn}`: {_fmt(e, '.2f')}",
                         verdict(None if e is None else e >= 0.9)])
    for t, lim in ((3, 0.7), (10, 0.45), (40, 0.35)):
        g = by.get(("mlp", t))
        if not g or "torch:dbmtl" not in g["variants"]:
            continue
        ref = _ms(g, "torch:dbmtl")
        for label, names in (("library", LIB_STRATEGIES + TRUNK_STRATEGIES), ("fused", FUSED_SUBJECTS)):
            bt, bn = _best(g, names)
            if bn is None:
                continue
            r = bt / ref if bt and ref else None
            rows.append([f"MLP T={t}: DB-MTL step ≤ {lim}× PyTorch ({label})", f"`{bn}`: {_fmt(r, '.2f')}×",
                         verdict(None if r is None else r <= lim)])
    for (prob, t), g in sorted(by.items()):
        if prob != "mlp":
            continue
        tr, bt = _ms(g, "jax:transform-only"), best_lib(g)[0]
        a, b = _ms(g, "jax:trunk-loop"), _ms(g, "jax:sum:trunk-loop")
        fa, fb = _ms(g, "jax:fused-inplace@1"), _ms(g, "jax:sum:fused@1")
        if tr and bt:
            marg = 100 * (a - b) / a if a and b else None
            fmarg = 100 * (fa - fb) / fa if fa and fb else None
            rows.append([f"MLP T={t}: transform ≤ 5% of the step",
                         f"alone {100 * tr / bt:.1f}% of `{best_lib(g)[1]}`; marginal {_fmt(marg, '.1f')}% (chain), "
                         f"{_fmt(fmarg, '.1f')}% (fused-inplace@1)",
                         verdict(min(x for x in (100 * tr / bt, fmarg) if x is not None) <= 5)])
    for (prob, t), g in sorted(by.items()):
        if prob != "mlp":  # conv: P = 5k shared floats, activations dominate; the target is about the MLP
            continue
        for name, e in g["variants"].items():
            if not name.startswith(("jax:fused@", "jax:fused-inplace@", "jax:chunk@", "jax:trunk-chunk@")):
                continue
            c = e.get("chunk")
            tp = transient_p(g, name)
            if c is None or tp is None:
                continue
            rows.append([f"{prob} T={t}: `{name[4:]}` transient ≤ (c+2)·P = {c + 2}P", f"{tp:.2f}P",
                         verdict(tp <= c + 2)])
    for (prob, t), g in sorted(by.items()):
        hb = (g.get("head_backward") or {}).get("trunk-loop")
        if hb:
            rows.append([f"{prob} T={t}: trunk-once head backward ≤ 1.1× one backward per head", f"{hb[1]:.3f}×",
                         verdict(hb[1] <= 1.1)])
    if not rows:
        return []
    return ["## Targets (from this run)", "",
            "Verdicts are computed from the numbers above; timing-based ones depend on the machine load noted at the top.",
            ""] + _table(["target", "measured", "verdict"], rows) + [""]


def write_report(results: dict, path: str) -> None:
    text = render(results)
    extra = results.get("analysis_md")
    if extra:
        text += "\n" + extra
    with open(path, "w") as f:
        f.write(text)

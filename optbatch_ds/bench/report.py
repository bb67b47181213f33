"""The benchmark's report: collect each run's outputs -> tabulate (mean ± std over seeds) -> plot.

Reads only what launch/train.py writes into a run directory (eval.json, eval_history.jsonl,
metrics.jsonl, selection.jsonl, config.json) plus bench_status.json, so a report can be rebuilt at
any time from finished runs (launch/bench.py --report-only). `optbatch_ds.bench.plan` plans, `grid` runs.
"""
from __future__ import annotations

import csv
import os
import platform
import re
import shlex
import time
from typing import NamedTuple

from optbatch_ds.bench.io import (WRONG_ANSWERS, fmt_value, mean_std, nanmean, read_json, read_jsonl, record_labels,
                                  tail, write_json)
from optbatch_ds.bench.plan import RunSpec
from optbatch_ds.step import TIME_PARTS as _STEP_PARTS

TIME_PARTS = (*_STEP_PARTS, "total")


# ---------------------------------------------------------------------------- collect

def _pool_size(run: RunSpec) -> int | None:
    """Usable training samples, as the trainer recorded them in config.json (None: the plan's count is used).

    Run directories written before config.json carried the count have only the start-up line of log.txt."""
    derived = (read_json(os.path.join(run.dir, "config.json")) or {}).get("derived", {})
    if "num_train_samples" in derived:
        return int(derived["num_train_samples"])
    for line in tail(os.path.join(run.dir, "log.txt"), 10**6):  # older runs: the human-readable banner
        m = re.search(r"\| train (\d+) samples \|", line)
        if m:
            return int(m.group(1))
    return None


class TrainedMix(NamedTuple):
    """What a run trained, from its selection log and the data's labels (nan / {} without labels).

    defective: share of the trained samples whose answer is labelled wrong (WRONG_ANSWERS).
    shares: {task: share of the trained samples}.
    untrained: {task: share of the task's right-answer records never trained in the whole run}."""

    defective: float
    shares: dict
    untrained: dict


def trained_mix(run_dir: str) -> TrainedMix:
    """The run's `TrainedMix`. The pool's mix is the dataset's (every sample is scored once per epoch), so a
    task's share moving away from its dataset share is the selection's doing; a right answer never trained is
    a fact the model was never shown (a prior that never lets a record be measured shows here)."""
    cfg = read_json(os.path.join(run_dir, "config.json")) or {}
    labels = record_labels(cfg.get("train_data"))
    if labels is None:
        return TrainedMix(float("nan"), {}, {})
    defects, tasks = labels
    bad = total = 0
    per_task: dict[str, int] = {}
    seen = set()
    for line in read_jsonl(os.path.join(run_dir, "selection.jsonl")):
        for i in line.get("selected", []):
            total += 1
            bad += defects[i] in WRONG_ANSWERS
            per_task[tasks[i]] = per_task.get(tasks[i], 0) + 1
            seen.add(i)
    if not total:
        return TrainedMix(float("nan"), {}, {})
    right: dict[str, list[int]] = {}
    for i, (d, t) in enumerate(zip(defects, tasks)):
        if d not in WRONG_ANSWERS:
            right.setdefault(t, [0, 0])[0] += i not in seen
            right[t][1] += 1
    return TrainedMix(bad / total, {t: n / total for t, n in sorted(per_task.items())},
                      {t: never / n for t, (never, n) in sorted(right.items())})


def collect_run(run: RunSpec, tasks_seen: set) -> dict:
    """One row: identity, status, final held-out metrics, totals, time breakdown, and the eval curve."""
    st = read_json(os.path.join(run.dir, "bench_status.json")) or {}
    ev = read_json(os.path.join(run.dir, "eval.json"))
    status = "ok" if ev is not None else st.get("status", "not run")
    row: dict = {"run": run.name, "label": run.label, "method": run.variant.method,
                 "ablation": ",".join(f"{k}={fmt_value(v)}" for k, v in run.variant.overrides.items()),
                 "prune_ratio": run.prune_ratio, "seed": run.seed, "status": status,
                 "train_batch_size": run.train_batch_size, "candidates": run.candidates}
    metrics = read_jsonl(os.path.join(run.dir, "metrics.jsonl"))
    last = metrics[-1] if metrics else {}
    pool = _pool_size(run)
    per_epoch = pool // run.candidates if pool else run.steps_per_epoch
    row["steps"] = last.get("step", 0)
    row["epochs"] = row["steps"] / per_epoch if per_epoch else float("nan")
    if ev is not None:
        tasks = ev.get("tasks", {})
        tasks_seen.update(tasks)
        row["heldout_loss"] = ev.get("loss")
        for key, name in (("exact_match", "em"), ("bleu4", "bleu4"), ("rougeL", "rougeL")):
            row[f"{name}_mean"] = nanmean([t.get(key) for t in tasks.values()])
            for task, t in tasks.items():
                row[f"{name}_{task}"] = t.get(key)
        for task, t in tasks.items():
            row[f"loss_{task}"] = t.get("loss")
    for key in ("samples_trained", "samples_scored", "tokens_trained", "flops"):
        row[key] = last.get(key, 0)
    # a reference model's training and scoring (launch/reference.py) come before step 1: its time counts from
    # the start, as its FLOPs do in the trainer's totals
    row["reference_wall_s"] = float(last.get("reference_wall_s", 0.0) or 0.0)
    row["reference_flops"] = float(last.get("reference_flops", 0.0) or 0.0)
    cum_wall, wall_at = row["reference_wall_s"], {}
    sums = dict.fromkeys(TIME_PARTS, 0.0)
    for m in metrics:
        t = m.get("time", {})
        for k in TIME_PARTS:
            sums[k] += float(t.get(k, 0.0) or 0.0)
        cum_wall += float(t.get("total", 0.0) or 0.0)
        wall_at[m.get("step")] = (cum_wall, m.get("flops", 0.0))
    # training time: the steps themselves (plus the reference's), without start-up and evaluations
    row["wall_s"] = sums["total"] + row["reference_wall_s"]
    for k in TIME_PARTS[:-1]:
        row[f"time_{k}"] = sums[k]
    history = []
    for h in read_jsonl(os.path.join(run.dir, "eval_history.jsonl")):
        step = h.get("step")
        if step not in wall_at:
            continue
        history.append({"step": step, "epoch": step / per_epoch if per_epoch else float("nan"),
                        "wall_s": wall_at[step][0], "flops": wall_at[step][1], "loss": h.get("loss"),
                        "em_mean": nanmean([t.get("exact_match") for t in h.get("tasks", {}).values()])})
    mix = trained_mix(run.dir)
    row["defective_trained"] = mix.defective
    row.update({f"mix_{t}": v for t, v in mix.shares.items()} | {f"untrained_{t}": v for t, v in mix.untrained.items()})
    row["eval_s"] = sum(float(h.get("seconds", 0.0) or 0.0) for h in read_jsonl(os.path.join(run.dir, "eval_history.jsonl")))
    row["elapsed_s"] = st.get("elapsed_s", float("nan"))
    row["run_dir"] = run.dir
    row["history"] = history
    return row


# ---------------------------------------------------------------------------- tabulate

def summarize(rows: list[dict], tasks: list[str]) -> list[dict]:
    """Mean and std over seeds per (variant, prune ratio), with compute relative to full-data training."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["prune_ratio"]), []).append(r)
    keys = (["heldout_loss", "em_mean", "bleu4_mean", "rougeL_mean"] + [f"em_{t}" for t in tasks]
            + [f"loss_{t}" for t in tasks] + [f"mix_{t}" for t in tasks] + [f"untrained_{t}" for t in tasks]
            + [f"bleu4_{t}" for t in tasks] + [f"rougeL_{t}" for t in tasks]
            + ["samples_trained", "samples_scored", "flops", "wall_s", "epochs", "defective_trained"] + [f"time_{k}" for k in TIME_PARTS[:-1]])
    out = []
    for (label, ratio), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        s = {"label": label, "method": rs[0]["method"], "ablation": rs[0]["ablation"], "prune_ratio": ratio,
             "runs": len(rs), "ok": len(ok), "failed": [r["run"] for r in rs if r["status"] not in ("ok", "not run")]}
        for k in keys:
            s[k], s[k + "_std"] = mean_std([r.get(k) for r in ok])
        out.append(s)
    full = [s for s in out if s["method"] == "full" and s["ok"]]
    curve = full_curve(rows)
    for s in out:
        for k in ("flops", "wall_s"):
            base = full[0][k] if full else float("nan")
            s[k + "_vs_full"] = s[k] / base if base and base == base else float("nan")
        # compute at equal quality: what full-data training spent to reach this run's final held-out loss
        s["full_flops_same_loss"], s["full_wall_same_loss"] = full_cost_to_reach(curve, s["heldout_loss"])
        f = s["full_flops_same_loss"]
        s["flops_saved_same_loss"] = 1.0 - s["flops"] / f if f == f and f > 0 else float("nan")
    return out


def paired_differences(rows: list[dict], key: str = "heldout_loss") -> list[dict]:
    """Per (variant, ratio): mean ± std over seeds of run - full (same seed) and run - random (same seed
    and ratio); the seeds where the run is below full ("wins"); and the run's FLOPs and wall time as ratios to
    full-data training's of the same seed. Empty when there is nothing to pair."""
    ok = [r for r in rows if r["status"] == "ok" and r.get(key) == r.get(key)]
    full_rows = {r["seed"]: r for r in ok if r["method"] == "full" and not r["ablation"]}
    full = {seed: r[key] for seed, r in full_rows.items()}
    rand = {(r["prune_ratio"], r["seed"]): r[key] for r in ok if r["method"] == "random" and not r["ablation"]}
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        if r["method"] != "full":
            groups.setdefault((r["label"], r["prune_ratio"]), []).append(r)
    out = []
    for (label, ratio), rs in groups.items():
        d_full = [r[key] - full[r["seed"]] for r in rs if r["seed"] in full]
        d_rand = [r[key] - rand[(ratio, r["seed"])] for r in rs
                  if (ratio, r["seed"]) in rand and r["method"] != "random"]
        if not d_full and not d_rand:
            continue
        (mf, sf), (mr, sr) = mean_std(d_full), mean_std(d_rand)
        paired = [(r, full_rows[r["seed"]]) for r in rs if r["seed"] in full_rows]
        flops = mean_std([r["flops"] / f["flops"] for r, f in paired if f.get("flops")])
        wall = mean_std([r["wall_s"] / f["wall_s"] for r, f in paired if f.get("wall_s")])
        out.append({"label": label, "prune_ratio": ratio, "vs_full": mf, "vs_full_std": sf, "n_full": len(d_full),
                    "wins": sum(d < 0 for d in d_full), "vs_random": mr, "vs_random_std": sr, "n_random": len(d_rand),
                    "flops_ratio": flops[0], "flops_ratio_std": flops[1], "wall_ratio": wall[0],
                    "wall_ratio_std": wall[1]})
    return out


def _cell(m: float, sd: float = float("nan"), fmt: str = "{:.3f}") -> str:
    if m != m:
        return "–"
    return fmt.format(m) + ("" if sd != sd else " ± " + fmt.format(sd))


def _signed(m: float, sd: float) -> str:
    if m != m:
        return "–"
    return f"{m:+.4f}" + ("" if sd != sd else f" ± {sd:.4f}")


def _saved_cell(s: dict) -> str:
    if s["method"] == "full":
        return "–"
    if s["full_flops_same_loss"] != s["full_flops_same_loss"]:
        return "full never this low" if s["heldout_loss"] == s["heldout_loss"] else "–"
    return f"{100 * s['flops_saved_same_loss']:+.0f}%"


def _sci(x: float) -> str:
    return "–" if x != x else f"{x:.3g}"


def full_curve(rows: list[dict]) -> list[dict]:
    """Held-out loss and EM of the full-data runs at each evaluation, mean over seeds."""
    by_step: dict[int, list[dict]] = {}
    for r in rows:
        if r["method"] == "full" and r["status"] == "ok":
            for h in r["history"]:
                by_step.setdefault(h["step"], []).append(h)
    return [{"step": s, "epoch": nanmean([h["epoch"] for h in hs]), "loss": nanmean([h["loss"] for h in hs]),
             "em_mean": nanmean([h["em_mean"] for h in hs]), "flops": nanmean([h["flops"] for h in hs]),
             "wall_s": nanmean([h["wall_s"] for h in hs]), "seeds": len(hs)} for s, hs in sorted(by_step.items())]


def full_cost_to_reach(curve: list[dict], loss: float) -> tuple[float, float]:
    """(FLOPs, training wall s) full-data training needed to first reach `loss` on its mean held-out curve.

    Linear interpolation between its evaluations; (nan, nan) when it never gets that low (the method
    beat full-data training's best) or the loss is below nothing measured. The first evaluation is
    taken as reached at its own cost even if `loss` is higher (no point before it is known)."""
    pts = [c for c in curve if c["loss"] == c["loss"] and c["flops"] == c["flops"]]
    if not pts or loss != loss:
        return float("nan"), float("nan")
    if pts[0]["loss"] <= loss:
        return pts[0]["flops"], pts[0]["wall_s"]
    for a, b in zip(pts, pts[1:]):
        if b["loss"] <= loss:
            t = (a["loss"] - loss) / (a["loss"] - b["loss"])
            return a["flops"] + t * (b["flops"] - a["flops"]), a["wall_s"] + t * (b["wall_s"] - a["wall_s"])
    return float("nan"), float("nan")


def plateau_epoch(curve: list[dict], tol: float = 0.01) -> float | None:
    """First epoch at which the held-out loss is within tol (relative) of its best: no later evaluation
    improves on it by more than tol (later ones may be worse: overfitting)."""
    pts = [c for c in curve if c["loss"] == c["loss"]]
    if len(pts) < 2:
        return None
    best = min(c["loss"] for c in pts)
    return next(c["epoch"] for c in pts if c["loss"] <= best * (1 + tol))


def plateau_note(curve: list[dict]) -> str | None:
    """Whether the epoch budget is past the point where full-data training stops improving."""
    p = plateau_epoch(curve)
    if p is None:
        return None
    pts = [c for c in curve if c["loss"] == c["loss"]]
    last, best = pts[-1], min(pts, key=lambda c: c["loss"])
    if p >= last["epoch"] - 1e-9:
        return (f"Full-data held-out loss was still improving at the end of the budget ({last['epoch']:.2f} "
                "epochs): raise --epochs to compare where full-data training has stopped improving.")
    return (f"Full-data held-out loss stopped improving (within 1% of its best) at epoch {p:.2f}; best "
            f"{best['loss']:.4f} at epoch {best['epoch']:.2f}, {last['loss']:.4f} at the end of the budget "
            f"({last['epoch']:.2f} epochs).")


def _md_header(args, meta: dict) -> list[str]:
    return ["# OptBatch benchmark", "",
            f"Command: `{meta['command']}`  ",
            f"Machine: {meta['machine']}  ",
            f"Data: {args.data or 'demo set'} (held-out: {args.eval_data or 'demo eval split'}); model: "
            f"{args.model or 'built-in small Llama'}; budget: "
            + (f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.epochs:g} epochs")
            + f"; {args.nproc} rank(s); {meta['finished']}.", "",
            "Mean ± std over seeds (std only with 2+ seeds). EM, BLEU-4 and ROUGE-L are in percent, their "
            "unlabelled columns are the mean over tasks. FLOPs are the trainer's estimate (6·N per trained token "
            "+ 2·N per scored token, plus the reference models' own FLOPs where a run uses reference losses); wall s "
            "is the training steps' own time plus the reference models' training and scoring time (start-up and "
            "evaluations excluded); ×full is the mean relative to full-data training. \"FLOPs saved at equal loss\" "
            "compares a method's FLOPs with what full-data training needed to first reach the same mean held-out loss "
            "(linear interpolation on its evaluation curve; negative: the method spent more). \"defective trained\" is "
            "the share of trained samples whose answer is labelled wrong (misaligned or truncated: 18% of the demo "
            "records; duplicates are right answers seen twice and do not count; labelled data only).", ""]


def _md_quality(summary: list[dict], tasks: list[str]) -> list[str]:
    head = (["method", "α", "ok", "held-out loss", "EM"] + [f"EM {t}" for t in tasks]
            + ["BLEU-4", "ROUGE-L", "defective trained", "samples trained", "FLOPs", "FLOPs ×full", "wall s",
               "wall ×full", "FLOPs saved at equal loss"])
    lines = ["## Quality and compute", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["label"], f"{s['prune_ratio']:.2f}", f"{s['ok']}/{s['runs']}",
                 _cell(s["heldout_loss"], s["heldout_loss_std"], "{:.4f}"),
                 _cell(s["em_mean"], s["em_mean_std"], "{:.1f}")]
        cells += [_cell(s[f"em_{t}"], s[f"em_{t}_std"], "{:.1f}") for t in tasks]
        cells += [_cell(s["bleu4_mean"], s["bleu4_mean_std"], "{:.1f}"), _cell(s["rougeL_mean"], s["rougeL_mean_std"], "{:.1f}"),
                  _cell(100 * s["defective_trained"], fmt="{:.1f}%"),
                  _cell(s["samples_trained"], float("nan"), "{:.0f}"), _sci(s["flops"]),
                  _cell(s["flops_vs_full"], fmt="{:.2f}"), _cell(s["wall_s"], s["wall_s_std"], "{:.1f}"),
                  _cell(s["wall_s_vs_full"], fmt="{:.2f}"), _saved_cell(s)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _md_paired(rows: list[dict]) -> list[str]:
    paired = paired_differences(rows)
    if not paired:
        return []
    lines = ["", "## Paired by seed: held-out loss difference (negative = lower loss than the reference)", "",
             "A seed fixes the model initialisation and the data order for every method, so the per-seed "
             "difference removes the part of the spread that all methods share. Mean ± std over the seeds "
             "both runs have; n = number of such seeds; FLOPs and wall time as ratios to full-data training's of "
             "the same seed.", "",
             "| method | α | − full | seeds below full | FLOPs / full | wall / full | − random (same α) | n |",
             "|---|---|---|---|---|---|---|---|"]
    for p in paired:
        lines.append(f"| {p['label']} | {p['prune_ratio']:.2f} | {_signed(p['vs_full'], p['vs_full_std'])} | "
                     f"{p['wins']}/{p['n_full']} | {_cell(p['flops_ratio'], p['flops_ratio_std'], '{:.3f}')} | "
                     f"{_cell(p['wall_ratio'], p['wall_ratio_std'], '{:.3f}')} | "
                     f"{_signed(p['vs_random'], p['vs_random_std'])} | {p['n_random']} |")
    return lines


def _md_tasks_and_time(summary: list[dict], tasks: list[str]) -> list[str]:
    lines = ["", "## Per task: held-out loss, and each task's share of the trained samples", "",
             "Every sample is a candidate once per epoch, so the candidates' task mix is the dataset's (full-data "
             "training's row); a share that moves away from it is the selection's doing. \"never trained\": the "
             "share of the task's right-answer records the run never trained (labelled data only).", ""]
    head = (["method", "α"] + [f"loss {t}" for t in tasks] + [f"share {t}" for t in tasks]
            + [f"never trained {t}" for t in tasks])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["label"], f"{s['prune_ratio']:.2f}"]
        cells += [_cell(s[f"loss_{t}"], s[f"loss_{t}_std"], "{:.3f}") for t in tasks]
        cells += [_cell(100 * s[f"mix_{t}"], fmt="{:.1f}%") for t in tasks]
        cells += [_cell(100 * s[f"untrained_{t}"], fmt="{:.1f}%") for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Where the time goes (s per run, summed over steps, mean over seeds)", ""]
    parts = list(TIME_PARTS[:-1])
    lines += ["| method | α | " + " | ".join(parts) + " | total |", "|" + "---|" * (len(parts) + 3)]
    for s in summary:
        lines.append(f"| {s['label']} | {s['prune_ratio']:.2f} | "
                     + " | ".join(_cell(s[f"time_{k}"], fmt="{:.2f}") for k in parts) + f" | {_cell(s['wall_s'], fmt='{:.2f}')} |")
    return lines


def _md_curve_and_failures(rows: list[dict]) -> list[str]:
    lines = []
    curve = full_curve(rows)
    if curve:
        lines += ["", "## Full-data training on the held-out split (the epoch budget)", "",
                  "| step | epoch | held-out loss | EM | seeds |", "|---|---|---|---|---|"]
        lines += [f"| {c['step']} | {_cell(c['epoch'], fmt='{:.2f}')} | {_cell(c['loss'], fmt='{:.4f}')} | "
                  f"{_cell(c['em_mean'], fmt='{:.1f}')} | {c['seeds']} |" for c in curve]
        note = plateau_note(curve)
        if note:
            lines += ["", note]
    failed = [r for r in rows if r["status"] not in ("ok", "not run")]
    lines += ["", "## Failed runs", ""]
    lines += [f"- {r['run']}: {r['status']} (see {os.path.join(r['run_dir'], 'failure.txt')})" for r in failed] or ["none"]
    return lines


def markdown(summary: list[dict], rows: list[dict], tasks: list[str], args, meta: dict) -> str:
    """results.md: the quality and cost table, the paired differences, per task, time, the full-data curve."""
    lines = (_md_header(args, meta) + _md_quality(summary, tasks) + _md_paired(rows)
             + _md_tasks_and_time(summary, tasks) + _md_curve_and_failures(rows))
    lines += ["", "## Plots", "", "![quality vs prune ratio](quality_vs_ratio.png)", "",
              "![quality vs compute](quality_vs_time.png)", "", "![held-out curve](heldout_vs_epoch.png)", ""]
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict], tasks: list[str]) -> None:
    cols = ["run", "label", "method", "ablation", "prune_ratio", "seed", "status", "steps", "epochs",
            "heldout_loss", "em_mean", "bleu4_mean", "rougeL_mean"]
    cols += [f"{m}_{t}" for m in ("em", "bleu4", "rougeL", "loss", "mix", "untrained") for t in tasks]
    cols += ["defective_trained", "samples_trained", "samples_scored", "tokens_trained", "flops", "wall_s"]
    cols += [f"time_{k}" for k in TIME_PARTS[:-1]] + ["eval_s", "elapsed_s", "train_batch_size", "candidates", "run_dir"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and v != v else v) for k, v in r.items()})


# ---------------------------------------------------------------------------- plot

def _group_histories(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(label, ratio) -> eval points averaged over seeds, matched by step."""
    out: dict[tuple, dict[int, list[dict]]] = {}
    for r in rows:
        if r["status"] == "ok":
            for h in r["history"]:
                out.setdefault((r["label"], r["prune_ratio"]), {}).setdefault(h["step"], []).append(h)
    return {g: [{k: nanmean([h[k] for h in hs]) for k in ("epoch", "wall_s", "flops", "loss", "em_mean")}
                for _, hs in sorted(by_step.items())] for g, by_step in out.items()}


def _plot_vs_ratio(plt, summary: list[dict], colors: dict, path: str) -> None:
    """Quality against prune ratio, error bars = std over seeds; full-data training as a band."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "heldout_loss", "held-out loss (lower is better)"),
                           (axes[1], "em_mean", "exact match, mean over tasks (%)")):
        for label, color in colors.items():
            pts = sorted((s["prune_ratio"], s[key], s[key + "_std"]) for s in summary
                         if s["label"] == label and s[key] == s[key])
            if not pts:
                continue
            x, y, e = zip(*pts)
            e = [0.0 if v != v else v for v in e]
            if label == "full":
                ax.axhline(y[0], color=color, ls="--", lw=1, label="full (α = 0)")
                ax.axhspan(y[0] - e[0], y[0] + e[0], color=color, alpha=0.12)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=color, label=None if label == "full" else label,
                        ls="-" if len(x) > 1 else "none")
        xs = [s["prune_ratio"] for s in summary] or [0.0]
        ax.set_xlim(-0.03, max(xs) + 0.05)
        ax.set_xlabel("prune ratio α")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if any(ax.get_legend_handles_labels()[0] for ax in axes):
        axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_vs_compute(plt, hist: dict, colors: dict, styles: dict, path: str) -> None:
    """Quality against compute: time to quality (wall, reference models included) and FLOPs to quality."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for (label, ratio), pts in sorted(hist.items()):
        for ax, xk, yk in ((axes[0, 0], "wall_s", "loss"), (axes[0, 1], "wall_s", "em_mean"),
                           (axes[1, 0], "flops", "loss"), (axes[1, 1], "flops", "em_mean")):
            ax.plot([p[xk] for p in pts], [p[yk] for p in pts], marker="o", ms=3, ls=styles[ratio],
                    color=colors.get(label), label=f"{label} α={ratio:.2f}")
    for ax, xl, yl in ((axes[0, 0], "training wall time (s)", "held-out loss"),
                       (axes[0, 1], "training wall time (s)", "exact match (%)"),
                       (axes[1, 0], "estimated FLOPs", "held-out loss"), (axes[1, 1], "estimated FLOPs", "exact match (%)")):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    if hist:
        axes[0, 1].legend(fontsize=6, loc="best", ncol=2)
    fig.suptitle("quality at equal compute (mean over seeds at each evaluation)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_vs_epoch(plt, hist: dict, colors: dict, styles: dict, epochs_budget: float | None, path: str) -> None:
    """Held-out curves against epochs: where full-data training stops improving."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (label, ratio), pts in sorted(hist.items()):
        full = label == "full"
        for ax, yk in ((axes[0], "loss"), (axes[1], "em_mean")):
            ax.plot([p["epoch"] for p in pts], [p[yk] for p in pts], marker="o", ms=3, ls=styles[ratio],
                    lw=2.5 if full else 1, color="black" if full else colors.get(label),
                    alpha=1 if full else 0.6, label=f"{label}" + ("" if full else f" α={ratio:.2f}"))
    for ax, yl in ((axes[0], "held-out loss"), (axes[1], "exact match (%)")):
        if epochs_budget:
            ax.axvline(epochs_budget, color="grey", ls=":", lw=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    if hist:
        axes[1].legend(fontsize=6, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(out_dir: str, summary: list[dict], rows: list[dict], epochs_budget: float | None) -> list[str]:
    """quality_vs_ratio.png, quality_vs_time.png and heldout_vs_epoch.png in out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(s["label"] for s in summary))
    colors = {l: plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")(i % 20) for i, l in enumerate(labels)}
    hist = _group_histories(rows)
    styles = {r: st for r, st in zip(sorted({g[1] for g in hist}), ["-", "--", "-.", ":"] * 8)}
    paths = [os.path.join(out_dir, name) for name in ("quality_vs_ratio.png", "quality_vs_time.png",
                                                      "heldout_vs_epoch.png")]
    _plot_vs_ratio(plt, summary, colors, paths[0])
    _plot_vs_compute(plt, hist, colors, styles, paths[1])
    _plot_vs_epoch(plt, hist, colors, styles, epochs_budget, paths[2])
    return paths


# ---------------------------------------------------------------------------- report

def _machine() -> str:
    try:
        import torch

        dev = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
               else "CPU only")
        versions = f"torch {torch.__version__}"
    except Exception:
        dev, versions = "unknown device", ""
    try:
        from importlib.metadata import version

        versions += f", deepspeed {version('deepspeed')}"
    except Exception:
        pass
    return f"{platform.node()} ({platform.platform()}, {os.cpu_count()} CPU cores, {dev}; {versions})"


def report(plan: list[RunSpec], args, argv: list[str]) -> tuple[list[dict], list[dict]]:
    tasks_seen: set = set()
    rows = [collect_run(r, tasks_seen) for r in plan]
    tasks = sorted(tasks_seen)
    for r in rows:  # every row has every task column, missing = NaN
        for m in ("em", "bleu4", "rougeL", "loss", "mix"):
            for t in tasks:
                r.setdefault(f"{m}_{t}", float("nan"))
        for k in ("heldout_loss", "em_mean", "bleu4_mean", "rougeL_mean"):
            r.setdefault(k, float("nan"))
    summary = summarize(rows, tasks)
    meta = {"command": "python launch/bench.py " + shlex.join(argv), "machine": _machine(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_csv(os.path.join(args.out, "results.csv"), rows, tasks)
    curve = full_curve(rows)
    write_json(os.path.join(args.out, "results.json"),
                {"meta": meta, "args": {k: v for k, v in vars(args).items()}, "tasks": tasks, "summary": summary,
                 "runs": rows, "paired": paired_differences(rows), "full_curve": curve,
                 "full_plateau_epoch": plateau_epoch(curve)})
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(summary, rows, tasks, args, meta))
    plot(args.out, summary, rows, None if args.max_steps > 0 else args.epochs)
    return rows, summary

"""Evaluation helpers for 05: which models, bootstrap intervals, paired differences, results by
need kind, blind pairwise preference, and the plots. 05 writes the report itself (report.md); every
number in it is recomputable from the saved rows with these functions.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from perm.cases import NEED_KINDS
from perm.protocol import preference_request

METRICS = ("resonation", "expression", "reception", "bystander", "reward", "format_rate", "completion_tokens",
           "truncation_rate", "judge_failures")
PAIRED = ("resonation", "expression", "reception", "bystander", "reward")
BY_KIND = PAIRED               # the judged scores; format and length are reported overall only


def resolve_models(spec: dict, runs_dir, base_model: str, sft_tag: str, grpo_tag: str) -> dict:
    """name -> {"model": base path or id, "adapter": folder or None, "source": what the user gave}.

    A value may be a hub id, a folder, an alias, or a runs/sft|grpo/<tag> folder (its adapter and
    the base model recorded in its config). The default is base, SFT and GRPO where they exist."""
    if not spec:
        spec = {"base": base_model}
        for name, stage, tag in (("sft", "sft", sft_tag), ("grpo", "grpo", grpo_tag)):
            if (Path(runs_dir) / stage / tag / "metrics.json").exists():
                spec[name] = str(Path(runs_dir) / stage / tag)
    out = {}
    for name, value in spec.items():
        folder = Path(value)
        if (folder / "adapter" / "adapter_config.json").exists() and (folder / "config.json").exists():
            config = json.loads((folder / "config.json").read_text())
            out[name] = {"model": config["settings"]["MODEL"], "adapter": str(folder / "adapter"), "source": value,
                         "run_config": config}
        else:
            out[name] = {"model": value, "adapter": None, "source": value, "run_config": None}
    return out


def per_case(rows: list[dict], metric: str) -> dict:
    """case id -> the mean of a metric over that case's answers (None values left out)."""
    values = defaultdict(list)
    for r in rows:
        v = r.get(metric)
        if v is not None:
            values[r["case_id"]].append(float(v))
    return {case: float(np.mean(v)) for case, v in values.items() if v}


def bootstrap(values: list[float], resamples: int, seed: int) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of resampled means), resampling cases with replacement."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def model_rows_metrics(rows: list[dict]) -> list[dict]:
    """Adds the per-answer metric columns that are derived: format_rate, truncation_rate, judge_failures."""
    for r in rows:
        r["format_rate"] = float(r["formatted"])
        r["truncation_rate"] = float(r["truncated"])
        r["judge_failures"] = float(r["failed"])
    return rows


def summarize(rows_by_model: dict, resamples: int, seed: int) -> dict:
    metrics = {}
    for name, rows in rows_by_model.items():
        for metric in METRICS:
            mean, lo, hi = bootstrap(list(per_case(rows, metric).values()), resamples, seed)
            metrics[f"{name}/{metric}"], metrics[f"{name}/{metric}_ci_low"], metrics[f"{name}/{metric}_ci_high"] = \
                mean, lo, hi
    names = list(rows_by_model)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for metric in PAIRED:
                pa, pb = per_case(rows_by_model[a], metric), per_case(rows_by_model[b], metric)
                diffs = [pb[c] - pa[c] for c in pa if c in pb]
                mean, lo, hi = bootstrap(diffs, resamples, seed)
                key = f"{b}_minus_{a}/{metric}"
                metrics[key], metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = mean, lo, hi
    return metrics


def need_kind(row: dict) -> str:
    """A row's need kind; a missing one (None or "") is "unknown"."""
    return row.get("need_kind") or "unknown"


def need_kinds(rows_by_model: dict) -> list[str]:
    """The need kinds present in any model's rows, in NEED_KINDS order (others sorted, "unknown" last)."""
    present = {need_kind(r) for rows in rows_by_model.values() for r in rows}
    return ([k for k in NEED_KINDS if k in present] + sorted(present - {*NEED_KINDS, "unknown"})
            + (["unknown"] if "unknown" in present else []))


def summarize_by_kind(rows_by_model: dict, resamples: int, seed: int) -> dict:
    """`<model>/kind/<need_kind>/<metric>` with `_ci_low`/`_ci_high`, and `<model>/kind/<need_kind>/cases`.

    The same per-case means as summarize, with cases resampled within each kind (same resamples and
    seed), so a kind's interval reflects how few cases it has."""
    metrics = {}
    for name, rows in rows_by_model.items():
        by_kind = defaultdict(list)
        for r in rows:
            by_kind[need_kind(r)].append(r)
        for kind in need_kinds({name: rows}):
            mine = by_kind[kind]
            for metric in BY_KIND:
                mean, lo, hi = bootstrap(list(per_case(mine, metric).values()), resamples, seed)
                key = f"{name}/kind/{kind}/{metric}"
                metrics[key], metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = mean, lo, hi
            metrics[f"{name}/kind/{kind}/cases"] = len({r["case_id"] for r in mine})
    return metrics


# ---------------------------------------------------------------- blind pairwise preference

def preference_pairs(rows_by_model: dict, reference: str, cases: dict, mode: str):
    """For every other model and every case, its first answer against the reference model's first
    answer, judged in both orders: a list of (model, case id, request shown as (model, reference),
    request shown as (reference, model))."""
    first = {name: {} for name in rows_by_model}
    for name, rows in rows_by_model.items():
        for r in rows:
            first[name].setdefault(r["case_id"], r["completion"])
    pairs = []
    for name in rows_by_model:
        if name == reference:
            continue
        for case_id, mine in first[name].items():
            theirs = first[reference].get(case_id)
            if theirs is None:
                continue
            case = cases[case_id]
            pairs.append((name, case_id, preference_request(case, mine, theirs, mode),
                          preference_request(case, theirs, mine, mode)))
    return pairs


def verdict(forward, backward) -> str | None:
    """'win' / 'loss' only when both orders agree; disagreement (or a tie in either) is a tie.
    `forward` is +1 when the model (shown as A) is preferred; `backward` is +1 when the reference
    (shown as A) is preferred. None when either judgment failed."""
    if forward is None or backward is None:
        return None
    if forward > 0 and backward < 0:
        return "win"
    if forward < 0 and backward > 0:
        return "loss"
    return "tie"


def preference_metrics(outcomes: list[dict], reference: str, resamples: int, seed: int) -> dict:
    metrics = {}
    for name in sorted({o["model"] for o in outcomes}):
        mine = [o for o in outcomes if o["model"] == name and o["verdict"] is not None]
        for kind in ("win", "tie", "loss"):
            mean, lo, hi = bootstrap([float(o["verdict"] == kind) for o in mine], resamples, seed)
            key = f"{name}_vs_{reference}/{kind}"
            metrics[key], metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = mean, lo, hi
        metrics[f"{name}_vs_{reference}/pairs"] = len(mine)
    return metrics


# ---------------------------------------------------------------- plots and report

def plot_perspectives(metrics: dict, names: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    perspectives = ("resonation", "expression", "reception")
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        xs = np.arange(len(perspectives)) + k * width
        means = [metrics[f"{name}/{p}"] for p in perspectives]
        err = [[m - metrics[f"{name}/{p}_ci_low"] for m, p in zip(means, perspectives)],
               [metrics[f"{name}/{p}_ci_high"] - m for m, p in zip(means, perspectives)]]
        axes[0].bar(xs, means, width, yerr=err, capsize=3, label=name)
        b = metrics[f"{name}/bystander"]
        axes[1].bar([k], [b], 0.6, yerr=[[b - metrics[f"{name}/bystander_ci_low"]],
                                         [metrics[f"{name}/bystander_ci_high"] - b]], capsize=3)
    axes[0].set_xticks(np.arange(len(perspectives)) + width * (len(names) - 1) / 2, perspectives)
    axes[0].set_ylim(1, 5)
    axes[0].set_ylabel("judge score (1-5), 95% CI")
    axes[0].legend()
    axes[1].set_xticks(range(len(names)), names)
    axes[1].set_ylim(0, 100)
    axes[1].set_title("bystander (0-100)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_preferences(metrics: dict, names: list[str], reference: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 1 + 0.6 * len(names)))
    left = np.zeros(len(names))
    for kind, color in (("win", "#2a9d8f"), ("tie", "#bbbbbb"), ("loss", "#e76f51")):
        values = np.array([metrics[f"{n}_vs_{reference}/{kind}"] for n in names])
        ax.barh(names, values, left=left, color=color, label=kind)
        left += values
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share of cases against {reference} (both orders must agree for a win)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grpo_curves(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [e for e in history if "reward" in e]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("reward", "total"), ("rewards/empathy_reward/mean", "empathy"),
                       ("rewards/bystander_reward/mean", "bystander"), ("rewards/length_reward/mean", "length")):
        axes[0].plot([e["step"] for e in steps if key in e], [e[key] for e in steps if key in e], label=label)
    for p in ("resonation", "expression", "reception"):
        key = f"perspective/{p}"
        axes[1].plot([e["step"] for e in steps if key in e], [e[key] for e in steps if key in e], label=p)
    axes[0].set_title("GRPO reward terms")
    axes[1].set_title("perspectives (1-5)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(metrics: dict, key: str, digits: int = 3) -> str:
    value = metrics.get(key)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if lo is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

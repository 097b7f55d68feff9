"""05_eval.py: the report, recomputable numbers, and the blind pairwise preference."""
import json

import pytest
from datasets import load_from_disk

from conftest import REPO, judge_for_test, run_stage
from perm.evaluation import bootstrap, need_kinds, per_case, preference_pairs, summarize_by_kind, verdict
from fake_openai import FakeJudgeServer


def test_smoke_eval_after_grpo_writes_report_plots_and_recomputable_numbers(smoke_runs):
    out = smoke_runs / "eval" / "default"            # 05 ran in the shared smoke pipeline
    report = (out / "report.md").read_text()
    assert "## PERM scores" in report and "| grpo |" in report and "## Blind pairwise preference" in report
    assert "the eval judge is the judge grpo was trained against" in report      # same tiny judge: said plainly
    # the eval judge sat the sanity battery first; an unfit one is named in the report's first lines
    fitness = json.loads((out / "metrics.json").read_text())
    assert fitness["sanity_cases"] == 3 and "eval judge's sanity battery (3 valid cases)" in report
    assert ("not evidence" in "\n".join(report.splitlines()[:4])) == (not fitness["eval_judge_fit"])
    assert len(list(out.glob("*.png"))) >= 2 and (out / "grpo_curves.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(load_from_disk(str(out / "generations"))["test"])
    assert {r["model"] for r in rows} == {"base", "sft", "grpo"}
    for name in ("base", "grpo"):
        mine = [r for r in rows if r["model"] == name]
        by_case = {}
        for r in mine:                                  # recomputed by hand: a case's answers averaged first
            if r["reward"] is not None:
                by_case.setdefault(r["case_id"], []).append(r["reward"])
        mean = sum(sum(v) / len(v) for v in by_case.values()) / len(by_case)
        lo, hi = metrics[f"{name}/reward_ci_low"], metrics[f"{name}/reward_ci_high"]
        assert metrics[f"{name}/reward"] == pytest.approx(mean, abs=1e-12)
        assert min(min(v) for v in by_case.values()) <= lo <= mean <= hi <= max(max(v) for v in by_case.values())
    for kind in ("win", "tie", "loss"):
        assert f"grpo_vs_base/{kind}" in metrics
    # per need kind: in the report (safety line included) and in metrics.json, recomputable like the rest
    assert "## Results by need kind" in report.split("## Plots")[0] and "**Safety" in report
    kinds = {r["need_kind"] or "unknown" for r in rows}
    assert kinds and all(f"grpo/kind/{k}/reward_ci_high" in metrics for k in kinds)
    assert sum(metrics[f"grpo/kind/{k}/cases"] for k in kinds) == metrics["cases"] == 4
    kind = sorted(kinds)[0]
    mine = [r for r in rows if r["model"] == "grpo" and (r["need_kind"] or "unknown") == kind]
    assert bootstrap(list(per_case(mine, "reward").values()), metrics["bootstrap_resamples"],
                     metrics["bootstrap_seed"])[0] == metrics[f"grpo/kind/{kind}/reward"]
    prefs = list(load_from_disk(str(out / "preferences"))["test"])
    assert len(prefs) == 2 * 4 and all(p["verdict"] in ("win", "tie", "loss") for p in prefs)


def kind_rows(model):
    """Two kinds with values exact in binary: vent cases average 0.5 and 1.0, safety 0.25 and 0.25 (one
    judge failure left out); two cases without a kind."""
    spec = [("c0", "vent", 0.25, 2), ("c0", "vent", 0.75, 4), ("c1", "vent", 1.0, 5),
            ("c2", "safety", 0.25, 1), ("c2", "safety", None, None), ("c3", "safety", 0.25, 3),
            ("c4", None, 0.5, 3), ("c5", "", 0.0, 1)]
    return [{"case_id": c, "model": model, "need_kind": k, "reward": r, "resonation": s, "expression": s,
             "reception": s, "bystander": None if s is None else 20.0 * s} for c, k, r, s in spec]


def test_by_kind_means_intervals_and_counts_resample_within_each_kind():
    rows_by_model = {"base": kind_rows("base"), "grpo": kind_rows("grpo")[:3]}     # grpo: vent cases only
    metrics = summarize_by_kind(rows_by_model, 500, 7)
    assert need_kinds(rows_by_model) == ["vent", "safety", "unknown"]             # NEED_KINDS order, unknown last
    assert metrics["base/kind/vent/reward"] == 0.75 and metrics["base/kind/vent/resonation"] == 4.0
    assert metrics["base/kind/vent/bystander"] == 80.0
    assert metrics["base/kind/safety/reward"] == 0.25 and metrics["base/kind/safety/resonation"] == 2.0
    assert metrics["base/kind/unknown/reward"] == 0.25                               # None and "" both unknown
    assert (metrics["base/kind/vent/cases"], metrics["base/kind/safety/cases"], metrics["base/kind/unknown/cases"]) \
        == (2, 2, 2)
    assert metrics["grpo/kind/vent/reward"] == 0.75 and metrics["grpo/kind/vent/cases"] == 2
    assert not any(k.startswith(("grpo/kind/safety/", "grpo/kind/unknown/")) for k in metrics)
    for key in [k for k in metrics if not k.endswith(("_ci_low", "_ci_high", "/cases"))]:
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], key
    # resampled within the kind: the vent interval spans its two case means, and only those
    assert 0.5 <= metrics["base/kind/vent/reward_ci_low"] < metrics["base/kind/vent/reward_ci_high"] <= 1.0
    assert metrics["base/kind/safety/reward_ci_low"] == metrics["base/kind/safety/reward_ci_high"] == 0.25
    assert (metrics["base/kind/vent/reward"], metrics["base/kind/vent/reward_ci_low"],
            metrics["base/kind/vent/reward_ci_high"]) == bootstrap([0.5, 1.0], 500, 7)


@pytest.mark.parametrize("forward, backward, expected", [
    (1, -1, "win"),      # A=model preferred, then B=model preferred: both orders agree
    (-1, 1, "loss"),
    (1, 1, "tie"),       # position bias: A preferred both times
    (-1, -1, "tie"),
    (0, -1, "tie"),
    (None, 1, None),     # a failed judgment is not a verdict
])
def test_order_disagreement_is_a_tie(forward, backward, expected):
    assert verdict(forward, backward) == expected


CASE = json.loads((REPO / "data" / "cases.jsonl").read_text().splitlines()[0])


def rows(model, texts):
    return [dict(CASE, case_id=f"c{i}", model=model, completion=t) for i, t in enumerate(texts)]


@pytest.mark.parametrize("preference, expected", [("longer", ["win", "loss"]), ("A", ["tie", "tie"])])
def test_each_pair_is_judged_in_both_orders(tmp_path, preference, expected):
    by_model = {"base": rows("base", ["short", "another, much longer answer"]),
                "grpo": rows("grpo", ["a much longer answer here", "tiny"])}
    cases = {f"c{i}": CASE for i in range(2)}
    pairs = preference_pairs(by_model, "base", cases, "direct")
    assert len(pairs) == 2
    for _, _, fwd, bwd in pairs:     # the same two answers, swapped
        a = fwd.messages[1][1].split("<answer_a>")[1].split("</answer_a>")[0]
        b = bwd.messages[1][1].split("<answer_b>")[1].split("</answer_b>")[0]
        assert a == b
    with FakeJudgeServer(preference=preference) as server:
        judge = judge_for_test("api", "fake", tmp_path, mode="direct", temperature=0.0, base_url=server.base_url,
                           cache_path=str(tmp_path / "c.sqlite"))
        results = judge.judge([r for _, _, f, b in pairs for r in (f, b)])
    assert server.requests == 4
    assert [verdict(results[2 * k].score, results[2 * k + 1].score) for k in range(2)] == expected


def test_ablation_script_trains_each_variant_and_reports_them_together(smoke_runs):
    runs_dir = smoke_runs
    proc = run_stage("tools/ablate.py", f"RUNS_DIR={runs_dir}", "SMOKE=True", "PERM_TAG=",
              "ABLATIONS={'no_bystander': {'BYSTANDER_COEF': 0.0, 'PERSPECTIVES': ['reception']}}",
              "EVAL_ARGS=['PAIRWISE=False', 'MAX_CASES=2']")
    config = json.loads((runs_dir / "grpo" / "no_bystander" / "config.json").read_text())["settings"]
    assert config["BYSTANDER_COEF"] == 0.0 and config["PERSPECTIVES"] == ["reception"]
    report = (runs_dir / "eval" / "ablations" / "report.md").read_text()
    assert "| sft |" in report and "| no_bystander |" in report
    assert "[ablate] no_bystander: reward " in proc.stdout and "false alarms " in proc.stdout   # safety, per variant

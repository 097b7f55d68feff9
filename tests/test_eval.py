"""05_eval.py: the report, recomputable numbers, and the blind pairwise preference."""
import json

import pytest
from datasets import load_from_disk

from conftest import REPO, run_stage
from perm.evaluation import bootstrap, per_case, preference_pairs, verdict
from perm.fake_openai import FakeJudgeServer
from perm.judges import make_judge


def test_smoke_eval_after_grpo_writes_report_plots_and_recomputable_numbers(runs_dir):
    for script in ("01_build_data.py", "02_sft.py", "04_grpo.py"):
        run_stage(script, f"RUNS_DIR={runs_dir}", "SMOKE=True")
    run_stage("05_eval.py", f"RUNS_DIR={runs_dir}", "SMOKE=True")
    out = runs_dir / "eval" / "default"
    report = (out / "report.md").read_text()
    assert "## PERM scores" in report and "| grpo |" in report and "## Blind pairwise preference" in report
    assert "the eval judge is the judge grpo was trained against" in report      # same tiny judge: said plainly
    assert len(list(out.glob("*.png"))) >= 2 and (out / "grpo_curves.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(load_from_disk(str(out / "generations"))["test"])
    assert {r["model"] for r in rows} == {"base", "sft", "grpo"}
    for name in ("base", "grpo"):
        mine = [r for r in rows if r["model"] == name]
        values = list(per_case(mine, "reward").values())
        mean, lo, hi = bootstrap(values, metrics["bootstrap_resamples"], metrics["bootstrap_seed"])
        assert (mean, lo, hi) == (metrics[f"{name}/reward"], metrics[f"{name}/reward_ci_low"],
                                  metrics[f"{name}/reward_ci_high"])
        assert lo <= mean <= hi
    for kind in ("win", "tie", "loss"):
        assert f"grpo_vs_base/{kind}" in metrics
    prefs = list(load_from_disk(str(out / "preferences"))["test"])
    assert len(prefs) == 2 * 4 and all(p["verdict"] in ("win", "tie", "loss") for p in prefs)


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
        judge = make_judge("api", "fake", tmp_path, "direct", 0.0, base_url=server.base_url,
                           cache_path=str(tmp_path / "c.sqlite"))
        results = judge.judge([r for _, _, f, b in pairs for r in (f, b)])
    assert server.requests == 4
    assert [verdict(results[2 * k].score, results[2 * k + 1].score) for k in range(2)] == expected


def test_ablation_script_trains_each_variant_and_reports_them_together(runs_dir):
    for script in ("01_build_data.py", "02_sft.py"):
        run_stage(script, f"RUNS_DIR={runs_dir}", "SMOKE=True")
    run_stage("tools/ablate.py", f"RUNS_DIR={runs_dir}", "SMOKE=True",
              "ABLATIONS={'no_bystander': {'BYSTANDER_COEF': 0.0, 'PERSPECTIVES': ['reception']}}",
              "EVAL_ARGS=['PAIRWISE=False', 'MAX_CASES=2']")
    config = json.loads((runs_dir / "grpo" / "no_bystander" / "config.json").read_text())["settings"]
    assert config["BYSTANDER_COEF"] == 0.0 and config["PERSPECTIVES"] == ["reception"]
    report = (runs_dir / "eval" / "ablations" / "report.md").read_text()
    assert "| sft |" in report and "| no_bystander |" in report

"""03_reward.py end to end on the tiny model, and its inputs."""
import json

from datasets import load_from_disk

from conftest import SMOKE_OUTPUT, run_stage

METRICS = ("judge_calls", "judge_failures", "cache_hits", "resonation_mean", "expression_mean", "reception_mean",
           "bystander_mean", "reward_mean", "reward_std_within_group", "frac_zero_std_groups", "format_rate",
           "sanity_accuracy", "prompt_tokens", "completion_tokens")


def test_smoke_reward_stage_samples_scores_and_checks_sanity(smoke_runs):
    runs_dir = smoke_runs
    out = runs_dir / "reward" / "default"
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(name in metrics for name in METRICS), set(METRICS) - set(metrics)
    assert metrics["answers"] == 6 and metrics["judge_failures"] == 0 and metrics["judge_calls"] > 0
    scored = load_from_disk(str(out / "scored"))["train"]
    for row in scored:
        if row["formatted"]:
            assert 1 <= row["resonation"] <= 5 and 0 <= row["bystander"] <= 100
            assert row["reward"] == row["empathy_reward"] + row["bystander_reward"] + row["length_reward"]
        else:
            assert row["empathy_reward"] == 0.2 and row["resonation"] is None
    sanity = load_from_disk(str(out / "sanity"))["train"]
    assert {"advice_dump", "empty", "injection", "mismatched", "over_analysis", "platitude",
            "reference"} <= set(sanity["model"])
    assert "perspective_correlation" in metrics and "sanity_accuracy" in SMOKE_OUTPUT["03_reward.py"]
    again = run_stage("03_reward.py", f"RUNS_DIR={runs_dir}", "SMOKE=True", "TAG=again")
    assert json.loads((runs_dir / "reward" / "again" / "metrics.json").read_text())["judge_calls"] == 0, again.stdout


def test_bad_answers_file_names_file_and_line(smoke_runs, tmp_path):
    runs_dir = smoke_runs
    bad = tmp_path / "answers.jsonl"
    row = {"persona": "p", "scenario": "s", "query": "q", "case_id": "c", "id": "a1", "completion": "x"}
    bad.write_text(json.dumps(row) + "\n" + json.dumps(dict(row, id="a2", completion=7)) + "\n")
    proc = run_stage("03_reward.py", f"RUNS_DIR={runs_dir}", "SMOKE=True", f"ANSWERS={bad}", "TAG=bad", check=False)
    assert proc.returncode != 0 and f"{bad}:2: field 'completion' must be a string" in proc.stdout
    assert not (runs_dir / "reward" / "bad").exists()


def test_missing_data_stage_says_what_to_run(runs_dir):
    proc = run_stage("03_reward.py", f"RUNS_DIR={runs_dir}", "SMOKE=True", check=False)
    assert proc.returncode != 0 and "01_build_data.py TAG=default" in proc.stdout


def test_battery_opponents_fit_the_case():
    from perm.sanity import UNSAFE_WARMTH, battery
    cases = [{"id": "a", "need_kind": "vent", "reference": "ref a"}, {"id": "b", "need_kind": "safety", "reference": "ref b"},
             {"id": "c", "need_kind": "vent", "reference": "ref c"}, {"id": "d", "need_kind": "safety", "reference": "ref d"}]
    vent = dict(battery(cases[0], cases))
    assert vent["reference"] == "ref a" and vent["mismatched"] == "ref c"     # the same need kind, another person
    assert "unsafe_warmth" not in vent
    safety = dict(battery(cases[1], cases))
    assert safety["mismatched"] == "ref d" and safety["unsafe_warmth"] == UNSAFE_WARMTH

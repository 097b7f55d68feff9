"""03_reward.py end to end on the tiny model, and its inputs."""
import json
import re
import shutil

import pytest
from datasets import load_from_disk

from conftest import REPO, SMOKE_OUTPUT, run_stage
from fake_openai import FakeJudgeServer

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
    assert {"advice_dump", "empty", "injection", "injection_raw", "mismatched", "generic", "generic_analysis",
            "over_analysis", "platitude", "reference"} <= set(sanity["model"])
    assert {"sanity_injection_raw", "sanity_beats_generic", "sanity_beats_empty"} <= set(metrics)
    assert "perspective_correlation" in metrics and "sanity_accuracy" in SMOKE_OUTPUT["03_reward.py"]
    again = run_stage("03_reward.py", f"RUNS_DIR={runs_dir}", "SMOKE=True", "TAG=again", "TEMPERATURE=0.9",
                      "LOAD_IN_4BIT=True")  # as pasted: the same answers and the same 4-bit judge
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
    assert "unsafe_warmth" not in vent and "generic" not in vent              # no sections: no near misses built
    safety = dict(battery(cases[1], cases))
    assert safety["mismatched"] == "ref d" and safety["unsafe_warmth"] == UNSAFE_WARMTH
    assert "mismatched" not in dict(battery(cases[0], cases[:1]))             # nobody else to mismatch with


def run_reward(*argv: str) -> None:
    """03 in this process, as `python 03_reward.py argv...` runs it."""
    from perm.settings import run_stage_file
    run_stage_file(REPO / "03_reward.py", *argv)["main"]()


def test_an_answers_file_is_scored_without_a_policy_and_the_judge_work_is_shown_first(
        smoke_runs, runs_dir, tmp_path, capsys, monkeypatch):
    """A RUNS_DIR with data and no SFT run, INIT=sft as the CPU preset sets it: scoring a file loads no
    policy and no adapter. Before judging, 03 prints the judge requests of the scoring and of the
    battery, and those are what it sends; SANITY_CASES=0 scores only (no battery request)."""
    shutil.copytree(smoke_runs / "data", runs_dir / "data")
    monkeypatch.setattr("perm.models.load_model", lambda *a, **k: pytest.fail("a policy was loaded"))
    valid = list(load_from_disk(str(runs_dir / "data" / "default" / "dataset"))["valid"])
    answers = tmp_path / "answers.jsonl"
    fields = ("persona", "scenario", "query", "hidden_need", "need_kind", "category")
    rows = [dict({k: c[k] for k in fields}, case_id=c["id"], id=f"{c['id']}#{name}", completion=text)
            for c in valid[:3] for name, text in [("ref", c["reference"]), ("plain", "Hang in there.")]]
    answers.write_text("".join(json.dumps(row) + "\n" for row in rows))
    read = lambda tag: json.loads((runs_dir / "reward" / tag / "metrics.json").read_text())
    with FakeJudgeServer(reject_logprobs="openai") as server:     # an endpoint without logprobs, too
        args = (f"RUNS_DIR={runs_dir}", "SMOKE=True", "INIT=sft", f"ANSWERS={answers}", "JUDGE=api",
                "JUDGE_MODEL=fake-judge", f"JUDGE_BASE_URL={server.base_url}")
        run_reward(*args, "TAG=scores", "SANITY_CASES=0")
        first, refused_first = capsys.readouterr().out, server.logprob_rejections
        run_reward(*args, "TAG=checked")                            # the smoke preset's SANITY_CASES=3
        second, refused_second = capsys.readouterr().out, server.logprob_rejections - refused_first
    scoring = int(re.search(r"scoring 6 answers: (\d+) judge requests to send \(0 answered", first).group(1))
    assert scoring == 3 * 8 and "sanity battery: off (SANITY_CASES=0)" in first   # answers without sections: no call
    scores = read("scores")
    assert scores["answers"] == 6 and scores["judge_failures"] == 0 and scores["judge_logprobs_rejected"] is True
    assert scores["judge_calls"] == scoring + refused_first                # + the sends refused for logprobs
    assert scores["sanity_judge_calls"] == 0 and scores["sanity_cases"] == 0
    assert not (runs_dir / "reward" / "scores" / "sanity").exists()
    # with the battery: the scoring is in the cache, and the battery sends what 03 said it would
    assert f"scoring 6 answers: 0 judge requests to send ({scoring} answered by the cache)" in second
    battery = int(re.search(r"sanity battery on 3 valid cases \(SANITY_CASES=0: none\): ([\d,]+) judge requests "
                            r"to send \((\d+) answered", second).group(1).replace(",", ""))
    checked = read("checked")
    assert checked["sanity_cases"] == 3
    assert checked["sanity_judge_calls"] == checked["judge_calls"] == battery + refused_second


def test_sanity_cases_reads_as_what_it_does():
    from perm.sanity import sanity_cases
    valid = [{"id": str(i)} for i in range(5)]
    assert sanity_cases(valid, None) == valid                       # None: every valid case
    assert sanity_cases(valid, 2) == valid[:2] and sanity_cases(valid, 0) == []   # 0: no battery
    for bad in (-1, "all", True, 2.5):
        with pytest.raises(SystemExit, match="SANITY_CASES"):
            sanity_cases(valid, bad)

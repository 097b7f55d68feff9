"""The judge gate: the sanity battery's near misses, scripted API judges that must be refused or
passed, and what the figures allow."""
import json

import pytest

from conftest import REPO, judge_for_test, reward_settings
from fake_openai import FakeJudgeServer, by_length, by_reference, by_rubric_words
from perm.cases import NEED_KINDS
from perm.prompts import split_sections
from perm.reward import PermScorer
from perm.sanity import COUNTED, battery, gate_refusal, report_lines, run_battery

LIBRARY = [json.loads(line) for line in (REPO / "data" / "cases.jsonl").read_text().splitlines()]
# the first case of every need kind (the sanity cases), the rest of the library their pool
CASES = [next(c for c in LIBRARY if c["need_kind"] == kind) for kind in NEED_KINDS]


def battery_figures(tmp_path, scorer, mode="direct"):
    with FakeJudgeServer(scorer=scorer) as server:
        judge = judge_for_test("api", "scripted", tmp_path, mode=mode, base_url=server.base_url,
                               cache_path=str(tmp_path / "cache.sqlite"))
        _, metrics = run_battery(PermScorer(judge, reward_settings(mode=mode)), CASES, pool=LIBRARY)
    return metrics


@pytest.mark.parametrize("name, scorer, fit", [
    ("length", by_length, False),                  # longer text scores higher, nothing else
    ("rubric_words", by_rubric_words, False),      # the rubric's own vocabulary scores higher
    ("reads_the_case", by_reference(LIBRARY), True),   # the case's own reference scores highest
])
def test_gate_refuses_judges_that_do_not_read_the_case(tmp_path, name, scorer, fit):
    metrics = battery_figures(tmp_path, scorer)
    assert metrics["sanity_cases"] == len(CASES)
    refusal = gate_refusal(metrics, 0.75)            # what 04 decides with MIN_SANITY_ACCURACY=0.75
    assert (refusal is None) == fit, (name, metrics)
    if fit:
        assert metrics["sanity_accuracy"] == 1.0
    else:
        assert "MIN_SANITY_ACCURACY=0.75" in refusal and metrics["sanity_accuracy"] < 0.75
        # the weak templates alone would have passed it: the old battery's verdict
        assert all(metrics[f"sanity_beats_{n}"] >= 0.75 for n in ("empty", "platitude", "advice_dump"))


def test_reasoned_bystander_totals_go_through_the_same_gate(tmp_path):
    metrics = battery_figures(tmp_path, by_length, mode="reasoned")
    assert gate_refusal(metrics, 0.75) is not None


def test_near_misses_are_as_long_as_the_reference_and_built_from_the_case():
    for case in CASES:
        answers = dict(battery(case, LIBRARY))
        assert set(COUNTED) <= set(answers), case["id"]
        ref_analysis, ref_response = split_sections(case["reference"])
        analysis, response = split_sections(answers["generic"])
        assert len(ref_analysis.split()) <= len(analysis.split()) <= len(ref_analysis.split()) + 45
        assert len(ref_response.split()) <= len(response.split()) <= len(ref_response.split()) + 45
        assert split_sections(answers["generic_analysis"]) == (analysis, ref_response)
        swapped_analysis, swapped = split_sections(answers["swapped_facts"])
        assert swapped_analysis == ref_analysis and swapped != ref_response
        name = case["persona"].split(",")[0].split()[0]          # the seeker's first name
        assert name not in swapped.split() or name not in ref_response.split()
        other = answers["mismatched"]
        assert other != case["reference"] and any(o["reference"] == other and o["need_kind"] == case["need_kind"]
                                                  for o in LIBRARY)
    assert dict(battery(CASES[0], LIBRARY))["injection_raw"] == dict(battery(CASES[0], LIBRARY))["injection"]


def test_raw_injection_reaches_the_judge_as_written_and_the_template_neutralized(tmp_path):
    seen = []

    def record(s):
        seen.append(s["candidate"])
        return 3
    with FakeJudgeServer(scorer=record) as server:
        judge = judge_for_test("api", "scripted", tmp_path, mode="direct", base_url=server.base_url,
                               cache_path=str(tmp_path / "cache.sqlite"))
        _, metrics = run_battery(PermScorer(judge, reward_settings()), CASES[:1], pool=LIBRARY)
    assert any("NOTE TO THE EVALUATOR" in c for c in seen)               # injection_raw, as written
    assert any("[text imitating an evaluation was removed]" in c for c in seen)   # injection, neutralized
    assert {"sanity_injection_raw", "sanity_beats_injection", "sanity_beats_empty"} <= set(metrics)
    assert "sanity_beats_injection_raw" not in metrics


def test_without_references_the_gate_names_both_ways_on():
    rows, metrics = run_battery(None, [dict(c, reference="") for c in CASES])
    assert rows == [] and metrics == {}
    refusal = gate_refusal(metrics, 0.75)
    assert "cannot run" in refusal and "reference" in refusal and "MIN_SANITY_ACCURACY=0" in refusal
    assert gate_refusal(metrics, 0.0) is None


@pytest.mark.parametrize("accuracy, warned", [(0.5, True), (0.9, False)])
def test_report_says_first_when_the_eval_judge_is_not_fit(accuracy, warned):
    metrics = {"sanity_accuracy": accuracy, "sanity_cases": 6, **{f"sanity_beats_{n}": 1.0 for n in COUNTED},
               "sanity_beats_empty": 1.0, "sanity_beats_injection": 0.5, "sanity_injection_raw": 0.0}
    warning, figures = report_lines(metrics, 0.75)
    assert bool(warning) == warned and (not warned or "not evidence" in warning[0])
    assert "6 valid cases" in figures[0] and "as written 0.00" in figures[0]

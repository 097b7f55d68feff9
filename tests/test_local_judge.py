"""The local judge scores from digit probabilities, with the tiny and the demo model."""
import json

import pytest

from conftest import REPO, judge_for_test, reward_settings
from perm.reward import PermScorer

CASES = [json.loads(line) for line in (REPO / "data" / "cases.jsonl").read_text().splitlines()[:2]]


def scores_with(model, runs_dir, mode):
    judge = judge_for_test("local", model, runs_dir, mode=mode, temperature=0.3, batch_size=4, max_reason_tokens=16)
    scorer = PermScorer(judge, reward_settings(mode=mode))
    return scorer.score(CASES, [c["reference"] for c in CASES], [150, 150]), judge


@pytest.mark.parametrize("mode", ["direct", "reasoned"])
def test_tiny_local_judge_scores_from_probabilities(runs_dir, mode):
    results, judge = scores_with("tiny", runs_dir, mode)
    for r in results:
        assert not r.failed and set(r.scores) == {"resonation", "expression", "reception"}
        assert all(1 <= v <= 5 for v in r.scores.values())
        assert any(v != round(v) for v in r.scores.values())      # an expectation, not a sampled digit
        assert 0 <= r.bystander <= 100 and len(r.subscores) == 5
        assert 0.2 <= r.empathy <= 1 and -0.5 <= r.bystander_reward <= 0
    assert judge.stats.failures == 0 and judge.stats.calls >= 16
    if mode == "reasoned":
        assert all(r.judge_texts["resonation"].rstrip().split("\n")[-1].startswith("Score: ") for r in results)
    again, judge2 = scores_with("tiny", runs_dir, mode)
    assert judge2.stats.calls == 0 and [r.scores for r in again] == [r.scores for r in results]  # cached


@pytest.mark.parametrize("mode", ["direct", "reasoned"])
def test_tiny_local_judge_with_sampled_scores_writes_digits(runs_dir, mode):
    """JUDGE_SCORE=sampled: a digit drawn at the score position at JUDGE_TEMPERATURE (or the one the
    reason wrote), the same for the same prompt, and never read from a cache of expectations."""
    def judged(score, cache):
        judge = judge_for_test("local", "tiny", runs_dir, mode=mode, temperature=1.0, batch_size=4,
                               max_reason_tokens=16, score=score, cache_path=str(runs_dir / cache))
        return PermScorer(judge, reward_settings(mode=mode)).score(CASES, [c["reference"] for c in CASES], [150, 150])
    expected = judged("expected", "shared.sqlite")
    sampled = judged("sampled", "shared.sqlite")
    values = [v for r in sampled for v in (*r.scores.values(), *r.subscores.values())]
    assert all(v == round(v) for v in values) and all(1 <= v <= 5 for r in sampled for v in r.scores.values())
    assert [r.scores for r in sampled] != [r.scores for r in expected]
    if mode == "direct":                        # nothing else is sampled: the same draws in a fresh cache
        assert [r.scores for r in judged("sampled", "fresh.sqlite")] == [r.scores for r in sampled]


@pytest.mark.slow
def test_demo_model_as_local_judge(runs_dir):
    results, judge = scores_with("smollm2-135m", runs_dir, "direct")
    for r in results:
        assert all(1 < v < 5 for v in r.scores.values()) and 0 < r.bystander < 100
    assert judge.stats.failures == 0


def test_model_identity_changes_with_the_model_and_reads_no_weights(runs_dir, tmp_path):
    import os
    import shutil
    from perm.judges import model_identity
    from perm.models import resolve_model
    folder = tmp_path / "m"
    shutil.copytree(resolve_model("tiny", runs_dir), folder)
    first = model_identity(str(folder))
    assert model_identity(str(folder)) == first and model_identity("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_identity(str(folder)) != first                          # a changed config
    second = model_identity(str(folder))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes())                            # rewritten: a new modification time
    assert model_identity(str(folder)) != second

"""Reward math against hand values, and the failure and format-failure rules."""
import pytest

from conftest import reward_settings
from perm.protocol import Judgment, JudgeStats
from perm.reward import PermScorer, bystander_term, combine, length_term, make_reward_functions

S = {"resonation": 2.0, "expression": 4.0, "reception": 4.0}


@pytest.mark.parametrize("mode, weights, expected", [
    ("harmonic", None, 3 / (1 / 2 + 1 / 4 + 1 / 4)),     # 3.0: PERM's default
    ("mean", None, 10 / 3),
    ("geometric", None, (2 * 4 * 4) ** (1 / 3)),         # 3.1748
    ("weighted", {"resonation": 2, "expression": 1, "reception": 1}, (2 * 2 + 4 + 4) / 4),  # 3.0
    ("weighted", {"resonation": 0, "expression": 1, "reception": 0}, 4.0),  # a dropped perspective
])
def test_combine_modes(mode, weights, expected):
    assert combine(S, mode, weights) == pytest.approx(expected)


def test_terms():
    assert bystander_term(100, 0.5) == 0.0 and bystander_term(0, 0.5) == -0.5
    assert bystander_term(60, 0.5) == pytest.approx(-0.2)
    assert length_term(700, 768, 0.001) == 0.0
    assert length_term(868, 768, 0.001) == pytest.approx(-0.1)


class ScriptedBackend:
    """Returns scores by perspective; `fail` names perspectives whose judgment fails."""
    bystander_by_criteria = True

    def __init__(self, scores, fail=()):
        self.scores, self.fail, self.stats, self.seen = scores, set(fail), JudgeStats(), []

    def judge(self, requests, on_done=None):
        self.seen += requests
        return [Judgment(None, error="boom") if r.perspective in self.fail else Judgment(self.scores[r.perspective])
                for r in requests]


class NoCacheJudge:
    def __init__(self, backend):
        self.backend, self.stats = backend, backend.stats

    def judge(self, requests):
        return self.backend.judge(requests)


CASE = {"persona": "P", "scenario": "S", "query": "Q", "hidden_need": "H"}
GOOD = "# Analysis\nShe feels torn.\n# Response\nThat sounds hard."


def scorer(scores=None, fail=(), **settings):
    backend = ScriptedBackend(scores or {"resonation": 2, "expression": 4, "reception": 4, "bystander": 4}, fail)
    return PermScorer(NoCacheJudge(backend), reward_settings(**settings)), backend


def test_full_reward_by_hand():
    sc, _ = scorer(length_limit=10)
    [r] = sc.score([CASE], [GOOD], [30])
    assert r.empathy == pytest.approx(3.0 / 5)                  # harmonic(2,4,4) = 3
    assert r.bystander == pytest.approx(75.0)                   # five criteria rated 4 → 15/20 each
    assert r.bystander_reward == pytest.approx(0.5 * (0.75 - 1))
    assert r.length_reward == pytest.approx(-0.02)
    assert r.reward == pytest.approx(0.6 - 0.125 - 0.02)


def test_format_failure_gets_the_floor_without_judge_calls():
    sc, backend = scorer(bystander_coef=0.5, length_limit=5)
    [r] = sc.score([CASE], ["No sections here, just a reply."], [8])
    assert backend.seen == [] and not r.formatted
    assert r.empathy == 0.2 and r.bystander_reward == -0.5 and r.length_reward == pytest.approx(-0.003)


def test_unformatted_answer_is_judged_whole_in_evaluation():
    sc, backend = scorer()
    [r] = sc.score([CASE], ["Just a reply."], [3], judge_unformatted=True)
    assert len(backend.seen) == 8 and r.empathy == pytest.approx(0.6) and not r.formatted


def test_failed_judgment_gives_none_from_every_reward_function():
    sc, _ = scorer(fail=("reception",))
    fns = make_reward_functions(sc)
    assert [f.__name__ for f in fns] == ["empathy_reward", "bystander_reward", "length_reward"]
    completions = [[{"role": "assistant", "content": GOOD}], [{"role": "assistant", "content": "no format"}]]
    columns = {k: [v, v] for k, v in CASE.items()} | {"id": ["a", "a"]}
    logged = {}
    outs = [f(prompts=[[], []], completions=completions, completion_ids=[[1] * 5, [1] * 3],
              log_metric=logged.__setitem__, **columns) for f in fns]
    assert [o[0] for o in outs] == [None, None, None]           # any failed judgment: dropped by TRL
    assert outs[0][1] == 0.2 and outs[1][1] == -0.5 and outs[2][1] == 0.0   # format failure: the floor
    assert logged["perspective/resonation"] == 2 and logged["format_rate"] == 0.5


def test_reward_functions_judge_once_per_batch():
    sc, backend = scorer()
    fns = make_reward_functions(sc)
    kwargs = dict(prompts=[[]], completions=[[{"role": "assistant", "content": GOOD}]], completion_ids=[[1]],
                  id=["a"], **{k: [v] for k, v in CASE.items()})
    for f in fns:
        f(**kwargs)
    assert len(backend.seen) == 8


def test_dropped_perspective_and_bystander_off():
    sc, backend = scorer(perspectives=("expression", "reception"), bystander_coef=0.0)
    [r] = sc.score([CASE], [GOOD], [3])
    assert [q.perspective for q in backend.seen] == ["expression", "reception"]
    assert r.empathy == pytest.approx(4 / 5) and r.bystander_reward == 0.0

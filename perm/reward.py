"""The PERM reward: judge every answer from four sides and combine (docs/method.md, "Reward").

    R = R_empathy + R_bystander + R_length
    R_empathy   = COMBINE(resonation, expression, reception) / 5              in [0.2, 1]
    R_bystander = BYSTANDER_COEF * (bystander / 100 - 1)                      in [-coef, 0]
    R_length    = -LENGTH_COEF * max(0, completion_tokens - LENGTH_LIMIT)

A format failure (a section missing) gets the floor of every judged term without judge calls; a
completion with any failed judgment gets None from every reward function, so TRL leaves it out.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from perm.judges import Judge
from perm.protocol import BYSTANDER_CRITERIA, PERSPECTIVES, build_requests
from perm.prompts import split_sections

COMBINE_MODES = ("harmonic", "mean", "geometric", "weighted")
EMPATHY_FLOOR = 0.2
FAILURE_WINDOW = 200   # judgments: large enough that one bad batch cannot trip the stop


class JudgeFailureRateExceeded(SystemExit):
    pass


DIRECT_WRITES, REASONED_WRITES = 5, 150   # tokens a judge writes per request, for cost estimates


@dataclass
class JudgeCost:
    """Judge requests a step will send (before retries) and their tokens, estimated before it runs."""
    requests: int = 0               # distinct requests the cache cannot answer
    cached: int = 0                 # requests the cache answers: free
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: "JudgeCost") -> "JudgeCost":
        return JudgeCost(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    def __str__(self) -> str:
        return (f"{self.requests:,} judge requests to send ({self.cached:,} answered by the cache), "
                f"~{self.prompt_tokens:,} prompt and ~{self.completion_tokens:,} completion tokens")


@dataclass
class RewardSettings:
    """The reward's settings, named as the stages' constants (docs/method.md, "Reward")."""
    mode: str                          # JUDGE_MODE
    perspectives: tuple                # PERSPECTIVES: drop one for an ablation
    combine: str                       # COMBINE
    weights: dict                      # PERSPECTIVE_WEIGHTS (COMBINE=weighted)
    bystander_coef: float              # BYSTANDER_COEF; 0 turns the bystander off
    length_limit: int                  # LENGTH_LIMIT (tokens)
    length_coef: float                 # LENGTH_COEF
    reception_sees_hidden_need: bool   # RECEPTION_SEES_HIDDEN_NEED
    max_failure_rate: float            # MAX_JUDGE_FAILURE_RATE

    @classmethod
    def from_settings(cls, s, prefix: str = "JUDGE") -> "RewardSettings":
        """From a stage's settings; `prefix` names its judge (05: EVAL_JUDGE)."""
        perspectives = tuple(s["PERSPECTIVES"])
        unknown = set(perspectives) - set(PERSPECTIVES)
        if unknown or not perspectives:
            raise SystemExit(f"error: PERSPECTIVES={list(perspectives)}; choose from {list(PERSPECTIVES)}")
        if s["COMBINE"] not in COMBINE_MODES:
            raise SystemExit(f"error: COMBINE={s['COMBINE']!r}; choose one of {', '.join(COMBINE_MODES)}")
        return cls(mode=s[f"{prefix}_MODE"], perspectives=perspectives, combine=s["COMBINE"],
                   weights=dict(s["PERSPECTIVE_WEIGHTS"]), bystander_coef=s["BYSTANDER_COEF"],
                   length_limit=s["LENGTH_LIMIT"], length_coef=s["LENGTH_COEF"],
                   reception_sees_hidden_need=s["RECEPTION_SEES_HIDDEN_NEED"],
                   max_failure_rate=s["MAX_JUDGE_FAILURE_RATE"])


# ---------------------------------------------------------------- the math

def combine(scores: dict, mode: str, weights: dict | None = None) -> float:
    """Combine 1-5 perspective scores into one 1-5 score."""
    values = list(scores.values())
    if mode == "harmonic":                                   # PERM default
        return len(values) / sum(1.0 / v for v in values)
    if mode == "mean":
        return sum(values) / len(values)
    if mode == "geometric":
        return math.exp(sum(math.log(v) for v in values) / len(values))
    if mode == "weighted":
        w = {p: (weights or {}).get(p, 0.0) for p in scores}
        if sum(w.values()) <= 0:
            raise ValueError("PERSPECTIVE_WEIGHTS must give a positive weight to some perspective")
        return sum(w[p] * v for p, v in scores.items()) / sum(w.values())
    raise ValueError(f"unknown COMBINE mode {mode!r}")


def empathy_term(scores: dict, mode: str, weights: dict | None = None) -> float:
    return combine(scores, mode, weights) / 5.0


def bystander_term(bystander: float, coef: float) -> float:
    return coef * (bystander / 100.0 - 1.0)


def criterion_to_points(score: float) -> float:
    """A 1-5 criterion rating mapped linearly to the paper's 0-20 sub-score (direct mode)."""
    return (score - 1.0) / 4.0 * 20.0


def length_term(completion_tokens: int, limit: int, coef: float) -> float:
    return -coef * max(0, completion_tokens - limit)


# ---------------------------------------------------------------- scoring answers

@dataclass
class Scored:
    formatted: bool
    failed: bool = False
    scores: dict = field(default_factory=dict)          # perspective -> 1-5
    bystander: float | None = None                      # 0-100
    subscores: dict = field(default_factory=dict)       # criterion -> 0-20
    judge_texts: dict = field(default_factory=dict)     # perspective -> the judge's text
    empathy: float | None = None
    bystander_reward: float | None = None
    length_reward: float = 0.0
    completion_tokens: int = 0

    @property
    def reward(self) -> float | None:
        if self.failed:
            return None
        return self.empathy + self.bystander_reward + self.length_reward

    def columns(self) -> dict:
        """The flat columns a scored answer carries in 03's and 05's datasets."""
        return {"formatted": self.formatted, "failed": self.failed, "completion_tokens": self.completion_tokens,
                **{p: self.scores.get(p) for p in PERSPECTIVES}, "bystander": self.bystander,
                **{f"bystander_{c.lower().replace(' ', '_')}": self.subscores.get(c) for c in BYSTANDER_CRITERIA},
                "empathy_reward": self.empathy, "bystander_reward": self.bystander_reward,
                "length_reward": self.length_reward, "reward": self.reward,
                **{f"judge_{p}": self.judge_texts.get(p, "") for p in (*PERSPECTIVES, "bystander")}}


class PermScorer:
    """Judges batches of answers and applies the reward math; tracks the judge failure rate."""

    def __init__(self, judge: Judge, settings: RewardSettings, auto_check: bool = True):
        """`auto_check=False` leaves the failure-rate stop to the caller (04 reduces it across processes)."""
        self.judge, self.s, self.auto_check = judge, settings, auto_check
        self.last: list[tuple[str, Scored]] = []              # the latest batch, for logging samples
        self.window = deque(maxlen=FAILURE_WINDOW)
        self.format_failures = 0
        self.answers = 0

    def score(self, cases: list[dict], completions: list[str], completion_tokens: list[int],
              judge_unformatted: bool = False, neutralized: bool = True) -> list[Scored]:
        """Score answers. `judge_unformatted` (evaluation only) judges an answer without sections
        whole, as both its analysis and its response, instead of giving it the floor.
        `neutralized=False` (the sanity battery's raw injection only) sends them as written."""
        s = self.s
        results, plan = [], []
        for case, text, tokens in zip(cases, completions, completion_tokens):
            result = Scored(formatted=split_sections(text) is not None, completion_tokens=tokens,
                            length_reward=length_term(tokens, s.length_limit, s.length_coef))
            results.append(result)
            requests = self.requests(case, text, judge_unformatted, neutralized)
            if requests is None:
                result.empathy = EMPATHY_FLOOR                    # PERM: format failure, no judge calls
                result.bystander_reward = -s.bystander_coef
                continue
            plan.append((result, requests))
        judgments = self.judge.judge([r for _, reqs in plan for r in reqs])
        at = 0
        for result, requests in plan:
            mine = judgments[at:at + len(requests)]
            at += len(requests)
            self.window.extend(j.score is not None for j in mine)
            self._fill(result, requests, mine)
        self.answers += len(results)
        self.format_failures += sum(not r.formatted for r in results)
        self.last = list(zip(completions, results))
        if self.auto_check:
            self.check_failure_rate()
        return results

    def requests(self, case: dict, text: str, judge_unformatted: bool = False, neutralized: bool = True):
        """The judge requests of one answer (as `score` sends them); None for a format failure, which
        gets the floor without a judge call."""
        s = self.s
        sections = split_sections(text)
        if sections is None and not judge_unformatted:
            return None
        analysis, response = sections or (text, text)
        return build_requests(case, analysis, response, s.mode, s.perspectives, bystander=s.bystander_coef > 0,
                              reception_sees_hidden_need=s.reception_sees_hidden_need,
                              bystander_by_criteria=self.judge.backend.bystander_by_criteria, neutralized=neutralized)

    def cost(self, cases: list[dict], completions: list[str], tok, neutralized: bool = True,
             seen: set | None = None) -> "JudgeCost":
        """What scoring these answers will send, before any retry: every distinct request that is
        neither in the judge's cache nor in `seen` (keys already counted; extended here), its prompt
        tokens counted with `tok` (an estimate where the judge's tokenizer differs), and the tokens a
        judge writes: a score line in direct mode, a short reason first in reasoned mode."""
        seen = set() if seen is None else seen
        cost, texts = JudgeCost(), []
        for case, text in zip(cases, completions):
            for request in self.requests(case, text, neutralized=neutralized) or []:
                key = self.judge.key(request)
                if key in seen:
                    continue
                seen.add(key)
                if self.judge.cache is not None and self.judge.cache.get(key) is not None:
                    cost.cached += 1
                else:
                    cost.requests += 1
                    texts.append("\n".join(m["content"] for m in request.chat()))
        if texts:
            cost.prompt_tokens = sum(map(len, tok(texts, add_special_tokens=False)["input_ids"]))
        cost.completion_tokens = cost.requests * (DIRECT_WRITES if self.s.mode == "direct" else REASONED_WRITES)
        return cost

    def _fill(self, result: Scored, requests, judgments) -> None:
        s = self.s
        criteria, n_criterion = {}, 0
        for request, j in zip(requests, judgments):
            if request.kind == "criterion":
                n_criterion += 1
            if j.score is None:
                result.failed = True
                result.judge_texts[request.perspective] = f"[failed: {j.error}] {j.text}".strip()
                continue
            if request.kind == "likert":
                result.scores[request.perspective] = j.score
                result.judge_texts[request.perspective] = j.text
            elif request.kind == "bystander":
                result.bystander, result.subscores = j.score, dict(j.subscores)
                result.judge_texts["bystander"] = j.text
            else:                                       # one bystander criterion, 1-5 → 0-20
                name = BYSTANDER_CRITERIA[n_criterion - 1]
                criteria[name] = criterion_to_points(j.score)
                result.judge_texts["bystander"] = (result.judge_texts.get("bystander", "") + f"\n[{name}] {j.text}").strip()
        if criteria and len(criteria) == len(BYSTANDER_CRITERIA):
            result.subscores, result.bystander = criteria, sum(criteria.values())
        if result.failed:
            return
        result.empathy = empathy_term(result.scores, s.combine, s.weights)
        result.bystander_reward = bystander_term(result.bystander, s.bystander_coef) if s.bystander_coef > 0 else 0.0

    def check_failure_rate(self, final: bool = False) -> None:
        """Stop past MAX_JUDGE_FAILURE_RATE, measured over the last FAILURE_WINDOW judgments (or
        over all of them at the end of a short run)."""
        failed, seen = self.window_counts()
        if failed > self.s.max_failure_rate * seen and (seen >= FAILURE_WINDOW or (final and seen)):
            raise JudgeFailureRateExceeded(self.failure_message(failed, seen))

    def window_counts(self) -> tuple[int, int]:
        return len(self.window) - sum(self.window), len(self.window)

    def failure_message(self, failed: int, seen: int) -> str:
        return (f"error: {failed / seen:.0%} of the last {seen} judgments failed "
                f"(MAX_JUDGE_FAILURE_RATE={self.s.max_failure_rate}). Check the judge "
                f"(JUDGE_BASE_URL, JUDGE_MODEL, JUDGE_TIMEOUT) and re-run: successful judgments are cached.")


# ---------------------------------------------------------------- TRL reward functions

def completion_text(completion) -> str:
    """TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return completion


def make_reward_functions(scorer: PermScorer, on_scored=None) -> list:
    """[empathy_reward, bystander_reward, length_reward] in TRL's shape; one judging pass per batch,
    shared by the three (the first call judges, the others read the memo). `on_scored(texts,
    results, cases)` sees every newly judged batch (04 writes them to completions.jsonl)."""
    memo: dict = {}

    def scored(completions, completion_ids, kwargs) -> list[Scored]:
        texts = [completion_text(c) for c in completions]
        ids = kwargs.get("id") or [str(i) for i in range(len(texts))]
        keys = [(i, t) for i, t in zip(ids, texts)]
        missing = [k for k in dict.fromkeys(keys) if k not in memo]
        if missing:
            if len(memo) > 4096:
                memo.clear()
            index = {k: n for n, k in enumerate(keys)}
            cases = [{f: kwargs[f][index[k]] for f in ("id", "persona", "scenario", "query", "hidden_need") if f in kwargs}
                     for k in missing]
            lengths = [len(completion_ids[index[k]]) if completion_ids is not None else 0 for k in missing]
            results = scorer.score(cases, [k[1] for k in missing], lengths)
            for key, result in zip(missing, results):
                memo[key] = result
            if on_scored:
                on_scored([k[1] for k in missing], results, cases)
        return [memo[k] for k in keys]

    def empathy_reward(prompts=None, completions=None, completion_ids=None, **kwargs):
        results = scored(completions, completion_ids, kwargs)
        log_metric = kwargs.get("log_metric")
        if log_metric:
            for p in scorer.s.perspectives:
                values = [r.scores[p] for r in results if p in r.scores]
                if values:
                    log_metric(f"perspective/{p}", sum(values) / len(values))
            values = [r.bystander for r in results if r.bystander is not None]
            if values:
                log_metric("perspective/bystander", sum(values) / len(values))
            log_metric("format_rate", sum(r.formatted for r in results) / len(results))
        return [None if r.failed else r.empathy for r in results]

    def bystander_reward(prompts=None, completions=None, completion_ids=None, **kwargs):
        return [None if r.failed else r.bystander_reward for r in scored(completions, completion_ids, kwargs)]

    def length_reward(prompts=None, completions=None, completion_ids=None, **kwargs):
        return [None if r.failed else r.length_reward for r in scored(completions, completion_ids, kwargs)]

    return [empathy_reward, bystander_reward, length_reward]

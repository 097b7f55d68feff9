"""The judge protocol: what a judge is asked and how its reply is read. Pure: no model, no network.

A `Request` is one judgment: a perspective, the rendered chat messages, and its kind:
  likert     a 1-5 score (resonation, expression, reception)
  criterion  one bystander criterion on 1-5 (direct mode, and always on a local judge)
  bystander  the five 0-20 bystander sub-scores and a 0-100 total (reasoned mode on an API judge)
  choice     a blind pairwise preference A / B / tie (evaluation)
  text       free text: a synthesized case, a first message, a teacher's answer
Every backend returns a `Judgment`; a failed one has `score=None` and a non-empty `error`.

Only the judge's own last line counts (docs/method.md, "Judges"), and a candidate's own lines that
imitate the protocol are neutralized before any judge sees them, so nothing inside an answer can
move its own score.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from perm.prompts import render

PERSPECTIVES = ("resonation", "expression", "reception")                 # PERM: the Empathy Cycle
BYSTANDER_CRITERIA = ("Content effectiveness", "Logical clarity", "Communication efficiency",
                      "Objectivity", "Accuracy")                          # PERM: the bystander
DIGITS = "12345"

# The output protocol, defined once for the prompts and the parsers.
REASONED_LIKERT = ("Write two or three sentences of reasoning, then end with a last line of exactly this form, "
                   "with N from 1 to 5:\nScore: N")
DIRECT_LIKERT = "Reply with one line only, of exactly this form, with N from 1 to 5:\nScore: N"
REASONED_BYSTANDER = ("Write two or three sentences of reasoning. Then score each criterion from 0 to 20 on its "
                      "own line, independently of the others and using the full range, and end with the total "
                      "from 0 to 100 as the last line:\n"
                      + "\n".join(f"- {c}: N / 20" for c in BYSTANDER_CRITERIA) + "\nTotal Score: N / 100")
DIRECT_CRITERION = ("Judge only this criterion: {criterion}. Reply with one line only, of exactly this form, "
                    "with N from 1 (very poor) to 5 (excellent):\nScore: N")
REASONED_CRITERION = ("Judge only this criterion: {criterion}. Write one or two sentences of reasoning, then end "
                      "with a last line of exactly this form, with N from 1 (very poor) to 5 (excellent):\nScore: N")
SCORE_PREFIX = "Score:"
PREFERENCE_PREFIX = "Preference:"
PREFERENCE_OPTIONS = ("A", "B", "tie")
PREFERENCE_SCORE = {"A": 1.0, "B": -1.0, "tie": 0.0}
REASONED_PREFERENCE = ("Write two or three sentences comparing them, then end with a last line of exactly this form, "
                       "with X being A, B or tie:\nPreference: X")
DIRECT_PREFERENCE = "Reply with one line only, of exactly this form, with X being A, B or tie:\nPreference: X"

_SCORE_LINE = re.compile(r"^[*_ ]*score[*_ ]*[:：][*_ ]*([1-5])(?:\.0+)?[*_ ]*(?:/[*_ ]*5)?[*_ .]*$", re.IGNORECASE)
_TOTAL_LINE = re.compile(r"^[*_ ]*total[ _]score[*_ ]*[:：][*_ ]*(\d{1,3})[*_ ]*(?:/[*_ ]*100)?[*_ .]*$", re.IGNORECASE)
_SUB_LINE = re.compile(r"^[-*• ]*[*_ ]*([a-z ]+?)[*_ ]*[:：][*_ ]*(\d{1,2})[*_ ]*(?:/[*_ ]*20)?[*_ .]*$", re.IGNORECASE)
_PREFERENCE_LINE = re.compile(r"^[*_ ]*preference[*_ ]*[:：][*_ ]*(a|b|tie)[*_ .]*$", re.IGNORECASE)
# What in a candidate imitates a judge's output or speaks to the judge: a score label with its
# number, a rating or grade with a number, a preference or verdict naming A, B or tie, an "N / 5|10|
# 20|100" fraction, a claimed rubric level, or words addressed to whoever grades the answer. A
# supporter writing to a person in need has no reason to write any of these.
_IMITATION = (r"\b(?:total[ _]?)?score\s*[*_]*\s*[:=：]|\b(?:rating|grade)\s*[*_]*\s*[:=：]\s*[*_]*\s*\d"
              r"|\b(?:preference|verdict)\s*[*_]*\s*[:=：]\s*[*_]*\s*(?:a|b|tie)\b"
              r"|\b\d{1,3}\s*/\s*(?:5|10|20|100)\b|\blevel\s*[1-5]\b|\b[1-5]\s*=\s*\w"
              r"|\b(?:evaluator|grader|rubric)s?\b|\bignore (?:all |any )?(?:the )?(?:previous|prior|above) instructions\b"
              r"|\b(?:highest|maximum|perfect|full|top) (?:score|rating)\b")
# ... and the sentence around it (up to a sentence end or a line break): that sentence is removed.
_IMITATING_SENTENCE = re.compile(rf"[^.!?\n]*(?:{_IMITATION})[^.!?\n]*[.!?]*", re.IGNORECASE)
NEUTRALIZED = "[text imitating an evaluation was removed]"


# ---------------------------------------------------------------- reading a judge's reply

def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def parse_likert(text: str) -> int | None:
    """The 1-5 score of the judge's own last line `Score: N`; anything else is None."""
    lines = _lines(text)
    m = _SCORE_LINE.match(lines[-1]) if lines else None
    return int(m.group(1)) if m else None


def parse_preference(text: str) -> str | None:
    """'A', 'B' or 'tie' from the judge's own last line `Preference: X`; anything else is None."""
    lines = _lines(text)
    m = _PREFERENCE_LINE.match(lines[-1]) if lines else None
    return {"a": "A", "b": "B", "tie": "tie"}[m.group(1).lower()] if m else None


def parse_bystander(text: str) -> tuple[float, dict] | None:
    """(total 0-100, {criterion: 0-20}) from the judge's last six lines, or None."""
    lines = _lines(text)
    total = _TOTAL_LINE.match(lines[-1]) if lines else None
    if not total or int(total.group(1)) > 100:
        return None
    subs = {}
    for line in lines[-1 - len(BYSTANDER_CRITERIA):-1]:
        m = _SUB_LINE.match(line)
        if m and int(m.group(2)) <= 20:
            name = next((c for c in BYSTANDER_CRITERIA if c.lower() == m.group(1).strip().lower()), None)
            if name:
                subs[name] = float(m.group(2))
    if len(subs) != len(BYSTANDER_CRITERIA):
        return None
    return float(total.group(1)), subs


def expected_digit(probs: dict[str, float]) -> float | None:
    """Expectation over the digits 1-5, renormalized. None when no finite mass falls on them (an
    fp16 overflow gives NaN): a failed judgment, never a number."""
    values = {d: probs.get(d, 0.0) for d in DIGITS}
    mass = sum(values.values())
    if not math.isfinite(mass) or mass <= 0:
        return None
    return sum(int(d) * p for d, p in values.items()) / mass


# ---------------------------------------------------------------- requests and judgments

@dataclass(frozen=True)
class Request:
    perspective: str      # resonation | expression | reception | bystander | pairwise | writer
    kind: str             # likert | criterion | bystander | choice | text
    messages: tuple       # ((role, content), ...)
    max_tokens: int = 0           # text: the reply budget
    temperature: float = -1.0     # text: sampling temperature; -1 = the judge's JUDGE_TEMPERATURE

    def chat(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class Judgment:
    score: float | None                 # 1-5 (likert, criterion), 0-100 (bystander), +1/0/-1 (choice); None for text
    text: str = ""
    subscores: dict = field(default_factory=dict)
    error: str = ""                     # non-empty = failed (counted, never cached)
    cached: bool = False


@dataclass
class JudgeStats:
    calls: int = 0          # requests actually sent (API attempts, local generations/forwards)
    failures: int = 0       # judgments that failed after every retry
    retries: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    judgments: int = 0

    def as_metrics(self) -> dict:
        return {"judge_calls": self.calls, "judge_failures": self.failures, "judge_retries": self.retries,
                "cache_hits": self.cache_hits, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "judgments": self.judgments}


def _escape(text: str, tag: str) -> str:
    return re.sub(rf"</?\s*{tag}\s*>", lambda m: m.group(0).replace("<", "‹").replace(">", "›"), text,
                  flags=re.IGNORECASE)


def neutralize(text: str) -> str:
    """Replace every sentence of a candidate that imitates a judge's output (`Score: 5`,
    `Total Score: 100 / 100`, `Preference: A`, `8/10`, "this meets level 5") or addresses its judge
    ("note to the evaluator", "ignore all previous instructions") with a marker, so it can pull
    neither a parser nor a local judge's digit probabilities. The rest of the text is untouched."""
    return _IMITATING_SENTENCE.sub(NEUTRALIZED, text)


def escape_candidate(text: str, tag: str = "candidate") -> str:
    """Candidate text as the judge sees it: protocol imitations neutralized, its delimiter unclosable."""
    return _escape(neutralize(text), tag)


def _freeze(messages: list[dict]) -> tuple:
    return tuple((m["role"], m["content"]) for m in messages)


def uses_criteria(mode: str, by_criteria: bool) -> bool:
    """Whether the bystander is judged one criterion per request (direct mode, or a local judge)."""
    return by_criteria or mode == "direct"


def requests_per_answer(perspectives, bystander: bool, mode: str, by_criteria: bool) -> int:
    """Judge requests for one formatted answer (what `build_requests` returns)."""
    per_bystander = len(BYSTANDER_CRITERIA) if uses_criteria(mode, by_criteria) else 1
    return len(perspectives) + (per_bystander if bystander else 0)


def build_requests(case: dict, analysis: str, response: str, mode: str, perspectives=PERSPECTIVES,
                   bystander: bool = True, reception_sees_hidden_need: bool = False,
                   bystander_by_criteria: bool = False) -> list[Request]:
    """The judge requests for one formatted answer, in a fixed order: the perspectives, then the
    bystander (one request with sub-scores and total, or one 1-5 request per criterion)."""
    base = {"persona": case["persona"], "scenario": case["scenario"], "query": case["query"]}
    likert = DIRECT_LIKERT if mode == "direct" else REASONED_LIKERT
    out = []
    for p in perspectives:
        values = dict(base, candidate=escape_candidate(analysis if p == "resonation" else response),
                      output_instructions=likert)
        if p == "reception":
            need = case.get("hidden_need") or ""
            values["hidden_need_note"] = (f"\n(What I hope for but have not said: {need})\n"
                                          if reception_sees_hidden_need and need else "")
        out.append(Request(p, "likert", _freeze(render(f"judge_{p}", **values))))
    if bystander:
        values = dict(base, candidate=escape_candidate(response))
        if uses_criteria(mode, bystander_by_criteria):
            template = DIRECT_CRITERION if mode == "direct" else REASONED_CRITERION
            for criterion in BYSTANDER_CRITERIA:
                msgs = render("judge_bystander", **values, output_instructions=template.format(criterion=criterion))
                out.append(Request("bystander", "criterion", _freeze(msgs)))
        else:
            msgs = render("judge_bystander", **values, output_instructions=REASONED_BYSTANDER)
            out.append(Request("bystander", "bystander", _freeze(msgs)))
    return out


def preference_request(case: dict, answer_a: str, answer_b: str, mode: str) -> Request:
    """One blind comparison; the score of its Judgment is +1 (A), -1 (B) or 0 (tie)."""
    messages = render("judge_pairwise", persona=case["persona"], scenario=case["scenario"], query=case["query"],
                      answer_a=escape_candidate(answer_a, "answer_a"), answer_b=escape_candidate(answer_b, "answer_b"),
                      output_instructions=DIRECT_PREFERENCE if mode == "direct" else REASONED_PREFERENCE)
    return Request("pairwise", "choice", _freeze(messages))


def text_request(messages: list[dict], max_tokens: int, temperature: float, role: str = "writer") -> Request:
    """A free-text request (a synthesized case, a first message, a teacher's answer)."""
    return Request(role, "text", _freeze(messages), max_tokens, temperature)

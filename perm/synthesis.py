"""LLM synthesis for the data stage: new cases from the bundled ones, and missing first messages.

Either judge backend writes the text (cached like every judge call); whatever it writes goes through
the same validation and deduplication as any input row, and rejects are counted in the data card.
"""
from __future__ import annotations

import json
import random
import re

from perm.cases import NEED_KINDS, RowError, validate
from perm.judges import Judge
from perm.protocol import text_request
from perm.prompts import render

NEED_DESCRIPTIONS = {
    "not_at_fault": "wants to hear they did nothing wrong", "grow": "wants to be guided to reflect and grow",
    "balanced_view": "wants a fair analysis of both sides", "deep_empathy": "wants their feeling truly understood",
    "vent": "wants to be listened to", "others_motives": "wants to understand why others acted as they did",
    "practical_advice": "wants help that works", "praise": "wants sincere recognition of what they did",
    "safety": "shows a risk signal (self-harm, abuse, a medical emergency) and needs to be kept safe and "
              "connected to help"}
CASE_KEYS = ("persona", "scenario", "query", "hidden_need")
SYNTH_TEMPERATURE = 0.9
SYNTH_MAX_TOKENS = 600


def _example(case: dict) -> str:
    return json.dumps({k: case[k] for k in (*CASE_KEYS, "need_kind", "category")}, ensure_ascii=False)


def synthesis_requests(seeds: list[dict], n: int, seed: int) -> list[tuple]:
    """n requests, each with two example cases and a target (need kind, area) cycling through the kinds."""
    rng = random.Random(seed)
    areas = sorted({c["category"] for c in seeds if c["category"]}) or ["life"]
    out = []
    for i in range(n):
        kind = NEED_KINDS[i % len(NEED_KINDS)]
        area = rng.choice(areas)
        examples = rng.sample(seeds, k=min(2, len(seeds)))
        messages = render("synthesize_case", need_kind=kind, category=area, need_description=NEED_DESCRIPTIONS[kind],
                          examples="\n".join(_example(c) for c in examples))
        out.append((text_request(messages, SYNTH_MAX_TOKENS, SYNTH_TEMPERATURE),
                    {"need_kind": kind, "category": area, "variant": i}))
    return out


def parse_case(text: str, target: dict) -> dict:
    """The JSON case in a writer's reply, validated; raises RowError with the reason."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if not match:
        raise RowError("no JSON object in the reply")
    try:
        row = json.loads(match.group(0))
    except json.JSONDecodeError as e:
        raise RowError(f"invalid JSON: {e.msg}")
    if not isinstance(row, dict):
        raise RowError("the reply is not a JSON object")
    for key in CASE_KEYS:
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise RowError(f"missing or empty {key!r}")
    case = {k: row[k].strip() for k in CASE_KEYS}
    case.update(need_kind=target["need_kind"], category=target["category"], source="synthetic", lang="en")
    return validate(case)


def synthesize_cases(judge: Judge, seeds: list[dict], n: int, seed: int) -> tuple[list[tuple], list[tuple]]:
    """(made, rejected): (label, case) pairs and (label, reason) pairs."""
    pairs = synthesis_requests([c for c in seeds if c.get("need_kind")] or seeds, n, seed)
    cases, rejected = [], []
    for (request, target), judgment in zip(pairs, judge.judge([r for r, _ in pairs])):
        label = f"synthetic #{target['variant'] + 1}"
        if judgment.error:
            rejected.append((label, f"writer failed: {judgment.error}"))
            continue
        try:
            cases.append((label, parse_case(judgment.text, target)))
        except RowError as e:
            rejected.append((label, f"bad synthetic case: {e}"))
    return cases, rejected


def write_first_messages(judge: Judge, partial: list[tuple[str, dict]]) -> tuple[list[tuple], list[tuple]]:
    """Fill `query` for cases that lack a first message; (written, rejected) as (location, ...) pairs."""
    requests = [text_request(render("first_message", persona=c["persona"], scenario=c["scenario"]), 300,
                             SYNTH_TEMPERATURE) for _, c in partial]
    cases, rejected = [], []
    for (location, case), judgment in zip(partial, judge.judge(requests)):
        if judgment.error:
            rejected.append((location, f"first message: writer failed: {judgment.error}"))
            continue
        try:
            cases.append((location, validate(dict(case, query=judgment.text.strip().strip('"')))))
        except RowError as e:
            rejected.append((location, f"first message: {e}"))
    return cases, rejected

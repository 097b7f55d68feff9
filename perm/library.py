"""Measures of the bundled case library's habits. The policy is fine-tuned on the references and the
judge check uses them as the answer to beat, so every habit they share becomes the policy's habit:
these shares are capped by the library's checks (tests/test_case_library.py) and reported in the
README's library card (tools/library_card.py)."""
from __future__ import annotations

import re
from collections import Counter, defaultdict

from perm.prompts import split_sections

PERSONA = re.compile(r"^([^\s,]+)(?: [^,]+)?, (\d{1,2}),")
SENTENCE = re.compile(r"(?<=[.!?])[\"')]*\s+(?=[\"'(]?[A-Z0-9])")
REFRAME = re.compile(r"\b(?:that|it|this|which|you)(?:'s| is| was|'re| are| were)\s+not\b[^.!?\n]{0,80}?[.;,:—–-]\s*"
                     r"(?:that|it|this|you)(?:'s| is| was|'re| are| were)\b", re.IGNORECASE)
NARRATES = re.compile(r"\b(?:I won'?t (?:give you|lecture|list|pile|bury|offer|tell you what)|I'?m not going to "
                      r"(?:lecture|give you (?:a list|advice|tips)|list|pile|tell you what)|no lecture|no list|no tips|"
                      r"no advice from me)\b", re.IGNORECASE)
# a phone number or short code next to a word that says to use it (a year or a sum does not count)
HELP_NUMBER = re.compile(r"\b(?:call|calling|text|texting|ring|dial|phone|line|number|on)\b[^.!?\n]{0,40}?\b\d[\d -]{1,14}\d\b"
                         r"|\b\d[\d -]{1,14}\d\b[^.!?\n]{0,25}?\b(?:line|helpline|hotline|free|any time|24)", re.IGNORECASE)
SERVICES = re.compile(r"\b(?:samaritans|childline|lifeline|crisis text line|kids helpline|shout|refuge|women's aid|"
                      r"nhs 111|beyond ?blue|papyrus|trevor project|telefonseelsorge|1800respect|mind|nspcc)\b", re.IGNORECASE)
SEARCH = re.compile(r"\b(?:search|google|look (?:it|one|them) up|easy to find)\b", re.IGNORECASE)


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def sentences(text: str) -> list[str]:
    return [t for t in SENTENCE.split(text.strip()) if t.strip()]


def casual(query: str) -> bool:
    """A seeker who writes casually: a lowercase 'i', or mostly lowercase sentence starts."""
    starts = [t.strip()[0] for t in sentences(query) if t.strip()[0].isalpha()]
    return bool(re.search(r"(?:^|\s)i(?:\s|')", query)) or bool(starts) and sum(c.islower() for c in starts) >= len(starts) / 2


def habits(cases: list[dict]) -> tuple[dict, list[str]]:
    """(shares, per-case problems) over the cases whose reference and persona parse. Shares:
    `question_endings`, `name_openings`, `reframes`, `semicolons` of the whole library, and per need
    kind `thin_analyses` (two sentences or fewer), `one_block` (Responses without a paragraph break)
    and `same_need_opening` (the largest group of hidden needs sharing their first four words)."""
    problems, counts, by_kind = [], Counter(), defaultdict(list)
    for c in cases:
        sections, persona = split_sections(c["reference"]), PERSONA.match(c["persona"])
        if not sections or not persona:
            continue
        analysis, response = sections
        by_kind[c["need_kind"]].append((c, analysis, response))
        counts["question_endings"] += response.rstrip("\"') ").endswith("?")
        counts["name_openings"] += analysis.startswith(persona.group(1))
        counts["reframes"] += bool(REFRAME.search(response))
        if ";" in response:
            counts["semicolons"] += 1
            if int(persona.group(2)) <= 19 or casual(c["query"]):
                problems.append(f"{c['id']}: a semicolon in a reply to a teenager or a casual writer")
        if (said := NARRATES.search(response)):
            problems.append(f"{c['id']}: the response narrates its own constraint ({said.group(0)!r})")
        if c["need_kind"] == "safety":
            if not (HELP_NUMBER.search(response) or SERVICES.search(response)):
                problems.append(f"{c['id']}: safety reference names no concrete service or number")
            if (said := SEARCH.search(response)):
                problems.append(f"{c['id']}: safety reference says to search ({said.group(0)!r})")
    n = sum(len(rows) for rows in by_kind.values()) or 1
    shares = {key: counts[key] / n for key in ("question_endings", "name_openings", "reframes", "semicolons")}
    for kind, rows in by_kind.items():
        opening, same = Counter(" ".join(words(c["hidden_need"])[:4]) for c, _, _ in rows).most_common(1)[0]
        shares[kind] = {"thin_analyses": sum(len(sentences(a)) <= 2 for _, a, _ in rows) / len(rows),
                        "one_block": sum("\n" not in r for _, _, r in rows) / len(rows),
                        "same_need_opening": same / len(rows), "need_opening": opening}
    return shares, problems

"""Seeker cases: the input formats, row validation, stable ids, deduplication, splits, data card.

Formats (docs/method.md, "Cases"), detected per file from the first row's keys:
  case    the project's own JSONL (docs/method.md, "File formats")
  perm    upstream PERM JSONL: persona.identity, scenario, dialogue[0]
  rlver   RLVER/SAGE seeker profiles: player, scene, task, first_talk (Chinese)
  esconv  ESConv conversations: situation, problem_type, dialog (or HF's one-JSON-string `text`)

This module is longer than the others because each input format needs its own reader, and they
share the validation, ids and splits below; it has no other job.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

NEED_KINDS = ("not_at_fault", "grow", "balanced_view", "deep_empathy", "vent", "others_motives",
              "practical_advice", "praise", "safety")
FIELDS = ("id", "persona", "scenario", "query", "hidden_need", "need_kind", "category", "reference",
          "source", "lang")
REQUIRED = ("persona", "scenario", "query")
# Character limits per field, there to catch a pasted file (a log, a whole JSONL) in one field, not to
# judge length: seekers write long messages, and 02 and 04 drop (and count) prompts over their token
# budgets. The free text takes about 6,000 English words (40,000 characters, past 10,000 tokens)
# or 40,000 Chinese characters; labels are short.
TEXT_CHARS = 40_000
MAX_CHARS = {"id": 200, "persona": TEXT_CHARS, "scenario": TEXT_CHARS, "query": TEXT_CHARS,
             "hidden_need": TEXT_CHARS, "need_kind": 40, "category": 80, "reference": TEXT_CHARS, "source": 80,
             "lang": 16}
FORMATS = ("case", "perm", "rlver", "esconv")
HF_PREFIX = "hf:"


class RowError(ValueError):
    """A malformed row: fails the run (or is skipped with SKIP_BAD_ROWS=True)."""


class RowSkip(ValueError):
    """A well-formed row that cannot become a case (e.g. a conversation with no substantive turn)."""


class MissingQuery(RowSkip):
    """A profile with everything but a first message: skipped, or given one by synthesis."""

    def __init__(self, message: str, partial: dict):
        super().__init__(message)
        self.partial = partial


# ---------------------------------------------------------------- reading

def iter_rows(path: str):
    """(location, row object) of a JSONL file, a JSON array file, or `hf:<dataset id>` (all splits).

    A row that is not a JSON object yields (location, RowError)."""
    for location, row in _iter_json(path):
        if not isinstance(row, (dict, RowError)):
            row = RowError(f"row must be a JSON object, got {type(row).__name__}")
        yield location, row


def _iter_json(path: str):
    if path.startswith(HF_PREFIX):
        from datasets import load_dataset
        name = path[len(HF_PREFIX):]
        for split, ds in load_dataset(name).items():
            for i, row in enumerate(ds):
                yield f"{path}[{split}]:row {i + 1}", row
        return
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            yield f"{path}:{e.lineno}", RowError(f"invalid JSON: {e.msg}")
            return
        for i, row in enumerate(items):
            yield f"{path}:item {i + 1}", row
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", RowError(f"invalid JSON: {e.msg} (column {e.colno})")


def detect_format(row) -> str | None:
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("text"), str) and row["text"].lstrip().startswith("{"):
        return "esconv"
    if "dialog" in row and "situation" in row:
        return "esconv"
    if "player" in row or "scene" in row:
        return "rlver"
    if "dialogue" in row and isinstance(row.get("persona"), dict):
        return "perm"
    if "query" in row:
        return "case"
    return None


def _text(row: dict, key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing field {key!r}")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowError(f"field {key!r} is empty")
    return value.strip()


def from_case(row: dict) -> dict:
    case = {key: _text(row, key, required=key in REQUIRED) for key in FIELDS}
    if "id" in row and not case["id"]:
        raise RowError("field 'id' is empty")
    return case


def from_perm(row: dict) -> dict:
    persona = row.get("persona")
    if not isinstance(persona, dict):
        raise RowError("field 'persona' must be an object with 'identity'")
    dialogue = row.get("dialogue")
    if not isinstance(dialogue, list) or not dialogue:
        raise RowError("field 'dialogue' must be a non-empty list")
    first = dialogue[0]
    if isinstance(first, dict):
        first = first.get("content", first.get("text"))
    return {"persona": _text({"identity": persona.get("identity")}, "identity"),
            "scenario": _text(row, "scenario"), "query": _text({"dialogue[0]": first}, "dialogue[0]"),
            "source": "perm", "lang": "en"}


# RLVER/SAGE: everything from the first heading that opens a simulator-only part is cut. Headings
# vary (markdown `#`, bold lines); "NPC" alone is no cut mark, since backgrounds mention the NPC.
_RLVER_HEADING = re.compile(r"^\s*(?:#{1,6}|\*\*|【)")
_RLVER_CUT = re.compile(r"不同状态|状态下|不同情绪|不同回复|回复的反应|对.{0,6}回复|隐藏主题|emotion", re.IGNORECASE)
# Hidden intention (task) → need kind, first match wins; order puts the specific before the broad.
_RLVER_KINDS = (("not_at_fault", r"没有错|不是(?:他|她|自己|我)?的错|没做错|无过错|不怪"),
                ("praise", r"认可|肯定|夸|表扬|赞"),
                ("others_motives", r"为什么|动机|原因|想法|用意"),
                ("balanced_view", r"客观|双方|两面|公正|全面"),
                ("grow", r"成长|反思|引导|启发"),
                ("practical_advice", r"建议|办法|解决|方法|方案"),
                ("vent", r"倾诉|倾听|发泄|听(?:他|她|我)说"),
                ("deep_empathy", r"共情|理解|感受"))


def cut_simulator_parts(text: str) -> str:
    kept = []
    for line in text.splitlines():
        if _RLVER_HEADING.match(line) and _RLVER_CUT.search(line):
            break
        if re.match(r"^\s*#{2,}\s*隐藏主题", line):
            break
        kept.append(line)
    return "\n".join(kept).strip()


def rlver_need_kind(task: str) -> str:
    for kind, pattern in _RLVER_KINDS:
        if re.search(pattern, task):
            return kind
    return ""


def from_rlver(row: dict) -> dict:
    persona = cut_simulator_parts(_text(row, "player"))
    scenario = cut_simulator_parts(_text(row, "scene"))
    if not persona or not scenario:
        raise RowError("'player' or 'scene' is empty once the simulator-only parts are cut")
    task = _text(row, "task", required=False)
    case = {"persona": persona, "scenario": scenario, "query": _text(row, "first_talk", required=False),
            "hidden_need": task, "need_kind": rlver_need_kind(task), "source": "rlver", "lang": "zh"}
    if not case["query"]:
        raise MissingQuery("no first message (first_talk); WRITE_FIRST_MESSAGES=True writes one", case)
    return case


_GREETING = re.compile(r"^(hi|hello|hey|hiya|good (morning|afternoon|evening)|how are you|i'?m (fine|good|ok)"
                       r"|not (too )?(good|great|well)|thanks?( you)?|yes|no|ok(ay)?)\b", re.IGNORECASE)


def from_esconv(row: dict) -> dict:
    if "text" in row and "dialog" not in row:
        try:
            row = json.loads(row["text"])
        except json.JSONDecodeError as e:
            raise RowError(f"field 'text' is not a JSON conversation: {e.msg}")
    dialog = row.get("dialog")
    if not isinstance(dialog, list):
        raise RowError("field 'dialog' must be a list of turns")
    query = ""
    for turn in dialog:
        if not isinstance(turn, dict) or turn.get("speaker") not in ("usr", "seeker"):
            continue
        said = (turn.get("text") or turn.get("content") or "").strip()
        words = len(said.split())
        if words >= 8 or (words >= 4 and not _GREETING.match(said)):  # skip "hi", "not good, you?"
            query = said
            break
    if not query:
        raise RowSkip("no substantive seeker turn")
    problem = _text(row, "problem_type", required=False) or "a personal difficulty"
    return {"persona": f"Someone reaching out for support about {problem.lower()}.",
            "scenario": _text(row, "situation"), "query": query, "category": problem,
            "source": "esconv", "lang": "en"}


READERS = {"case": from_case, "perm": from_perm, "rlver": from_rlver, "esconv": from_esconv}


# ---------------------------------------------------------------- validation and ids

def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def content_id(case: dict) -> str:
    """A stable id from content: same persona, scenario and query → same id."""
    digest = hashlib.sha256("\x1f".join(normalize(case[k]) for k in REQUIRED).encode()).hexdigest()
    return f"{case.get('source') or 'case'}-{digest[:10]}"


def validate(case: dict) -> dict:
    """Fill optional fields, check limits and need kind; return the case or raise RowError."""
    case = {key: case.get(key, "") or "" for key in FIELDS}
    for key in REQUIRED:
        if not case[key].strip():
            raise RowError(f"field {key!r} is empty")
    for key, limit in MAX_CHARS.items():
        if len(case[key]) > limit:
            raise RowError(f"field {key!r} has {len(case[key])} characters (limit {limit})")
    if case["need_kind"] and case["need_kind"] not in NEED_KINDS:
        raise RowError(f"need_kind {case['need_kind']!r} is not one of {', '.join(NEED_KINDS)}")
    if not case["id"]:
        case["id"] = content_id(case)
    case["lang"] = case["lang"] or "en"
    return case


def load_cases(inputs: list[str], formats: dict, skip_bad_rows: bool, missing_query: list | None = None):
    """Read every input; return (cases, dropped) where dropped lists (location, reason).

    A malformed row raises RowError('<file>:<line>: <reason>') unless skip_bad_rows. Rows that lack
    only a first message go to `missing_query` as (location, partial case) when a list is given
    (the data stage can write them one), else they are dropped and counted."""
    found, dropped = [], []
    for path in inputs:
        fmt = formats.get(path)
        if fmt is not None and fmt not in FORMATS:
            raise RowError(f"INPUT_FORMATS[{path!r}] = {fmt!r}; choose one of {', '.join(FORMATS)}")
        if not path.startswith(HF_PREFIX) and not Path(path).is_file():
            raise RowError(f"{path}: input file not found")
        for location, row in iter_rows(path):
            try:
                if isinstance(row, RowError):
                    raise row
                if fmt is None:
                    fmt = detect_format(row)
                    if fmt is None:
                        raise RowError(f"cannot tell the format from keys {sorted(row)}; "
                                       f"set INPUT_FORMATS for this file ({', '.join(FORMATS)})")
                    print(f"[data] {path}: format {fmt}")
                case = READERS[fmt](row)
                case["source"] = case.get("source") or Path(path).stem.removeprefix(HF_PREFIX)
                found.append((location, validate(case)))
            except MissingQuery as e:
                if missing_query is None:
                    dropped.append((location, f"skipped: {e}"))
                else:
                    missing_query.append((location, e.partial))
            except RowSkip as e:
                dropped.append((location, f"skipped: {e}"))
            except RowError as e:
                if not skip_bad_rows:
                    raise RowError(f"{location}: {e}") from None
                dropped.append((location, f"bad row: {e}"))
    cases, duplicates = deduplicate(found)
    return cases, dropped + duplicates


def deduplicate(found: list[tuple[str, dict]]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Keep the first of cases with the same scenario and query (after normalizing case, spacing and
    punctuation) and the first of each id; (kept, dropped)."""
    kept, dropped, seen_ids, seen_text = [], [], {}, {}
    for location, case in found:
        key = normalize(case["scenario"] + " " + case["query"])
        if key in seen_text:
            dropped.append((location, f"duplicate of {seen_text[key]}"))
        elif case["id"] in seen_ids:
            dropped.append((location, f"id {case['id']!r} already used at {seen_ids[case['id']]}"))
        else:
            seen_text[key], seen_ids[case["id"]] = case["id"], location
            kept.append(case)
    return kept, dropped


# ---------------------------------------------------------------- splits

def _strata(cases: list[dict], seed: int) -> list[list[dict]]:
    """Cases grouped by need kind (else category), each group in a seeded hash order of its ids."""
    groups = defaultdict(list)
    for case in cases:
        groups[case["need_kind"] or case["category"] or "all"].append(case)
    return [sorted(groups[name], key=lambda c: hashlib.sha256(f"{seed}:{c['id']}".encode()).hexdigest())
            for name in sorted(groups)]


def _interleave(groups: list[list[dict]]) -> list[dict]:
    """Round robin over the groups, so any prefix of the result spans every kind."""
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def select_cases(cases: list[dict], max_cases: int, seed: int) -> list[dict]:
    """A sample of `max_cases` cases balanced over the need kinds (equal numbers per kind while each
    kind lasts), or all of them."""
    if not max_cases or max_cases >= len(cases):
        return cases
    return _interleave(_strata(cases, seed))[:max_cases]


def split_cases(cases: list[dict], valid_fraction: float, test_fraction: float, seed: int) -> dict:
    """Deterministic stratified split: within each need kind (else category), cases are ordered by
    a seeded hash of their id; test and valid take their share (at least one each from a group of
    three or more), train the rest. Same ids + seed → same split, whatever the input order. Each
    split is ordered round robin over the kinds, so its first N cases (03's and 04's sanity battery,
    a MAX_CASES sample) span every kind."""
    splits = {"train": [], "valid": [], "test": []}
    parts = {name: [] for name in splits}
    for group in _strata(cases, seed):
        n = len(group)
        n_test, n_valid = round(n * test_fraction), round(n * valid_fraction)
        if n >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_valid = max(n_valid, 1 if valid_fraction > 0 else 0)
        parts["test"].append(group[:n_test])
        parts["valid"].append(group[n_test:n_test + n_valid])
        parts["train"].append(group[n_test + n_valid:])
    return {name: _interleave(groups) for name, groups in parts.items()}


# ---------------------------------------------------------------- data card

def data_card(splits: dict, dropped: list) -> dict:
    rows = [dict(c, split=s) for s, cs in splits.items() for c in cs]
    card = {"rows": len(rows), "dropped": len(dropped)}
    for field in ("split", "source", "need_kind", "category", "lang"):
        card[f"by_{field}"] = dict(sorted(Counter(r[field] or "-" for r in rows).items()))
    card["kind_by_split"] = {s: dict(sorted(Counter(c["need_kind"] or "-" for c in cs).items()))
                             for s, cs in splits.items()}
    card["words"] = {}
    for field in ("persona", "scenario", "query", "reference"):
        lengths = [len(r[field].split()) for r in rows if r[field]]
        if lengths:
            p = np.percentile(lengths, [5, 50, 95])
            card["words"][field] = {"n": len(lengths), "p5": float(p[0]), "p50": float(p[1]),
                                    "p95": float(p[2]), "max": max(lengths)}
    card["dropped_reasons"] = dict(Counter(re.sub(r" \S+$", "", reason) if reason.startswith("duplicate")
                                           else reason for _, reason in dropped))
    card["dropped_rows"] = [f"{loc}: {reason}" for loc, reason in dropped]
    return card


def card_markdown(card: dict) -> str:
    lines = ["# Data card\n", f"{card['rows']} cases kept, {card['dropped']} rows dropped.\n"]
    for field in ("split", "source", "need_kind", "category", "lang"):
        counts = card[f"by_{field}"]
        lines.append(f"**{field}**: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + "\n")
    lines.append("| need kind | " + " | ".join(card["kind_by_split"]) + " |")
    lines.append("|---|" + "---|" * len(card["kind_by_split"]))
    kinds = sorted({k for c in card["kind_by_split"].values() for k in c})
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(str(c.get(kind, 0)) for c in card["kind_by_split"].values()) + " |")
    lines.append("\n| field (words) | n | p5 | p50 | p95 | max |\n|---|---|---|---|---|---|")
    for field, s in card["words"].items():
        lines.append(f"| {field} | {s['n']} | {s['p5']:.0f} | {s['p50']:.0f} | {s['p95']:.0f} | {s['max']} |")
    if card["dropped_rows"]:
        lines.append("\nDropped rows:")
        lines += [f"- {row}" for row in card["dropped_rows"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- answers JSONL

def load_answers(path: str) -> list[dict]:
    """Rows of an answers JSONL (docs/method.md, "File formats"): case fields, `case_id`, `id`, `completion`,
    optional `model`. A malformed row raises RowError naming `file:line`."""
    if not Path(path).is_file():
        raise RowError(f"{path}: answers file not found")
    rows, seen = [], set()
    for location, row in iter_rows(path):
        try:
            if isinstance(row, RowError):
                raise row
            case = validate(from_case(row))
            answer = {**case, "case_id": _text(row, "case_id"), "id": _text(row, "id"),
                      "model": _text(row, "model", required=False)}
            if not isinstance(row.get("completion"), str):
                raise RowError("field 'completion' must be a string")
            answer["completion"] = row["completion"]
            if answer["id"] in seen:
                raise RowError(f"answer id {answer['id']!r} is used twice")
        except RowError as e:
            raise RowError(f"{location}: {e}") from None
        seen.add(answer["id"])
        rows.append(answer)
    return rows

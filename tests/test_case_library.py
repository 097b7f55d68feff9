"""Quality check of the bundled case library (data/cases.jsonl).

Fails on: a missing or empty field, a need kind or life area below its quota, near-duplicate cases,
a reference outside the length band or missing a section, a query that repeats its hidden need's
wording, stock comfort phrases in a reference. Each check is also shown to catch a bad case.
"""
import itertools
import json
import re
from collections import Counter

import pytest

from conftest import REPO
from perm.cases import FIELDS, NEED_KINDS
from perm.prompts import ANALYSIS_HEADING, RESPONSE_HEADING, split_sections

LIBRARY = REPO / "data" / "cases.jsonl"
MIN_CASES = 150
KIND_QUOTA = 15
AREAS = ("work", "study", "family", "romance", "friendship", "health", "grief", "money", "identity",
         "parenting", "moving", "good_news")
AREA_QUOTA = 5
REFERENCE_WORDS = (120, 220)
NEAR_DUPLICATE = 0.5     # word-set Jaccard of scenario + query; the library's closest pair is ~0.26
LEAK_RUN = 4             # a query may not share this many consecutive words with its hidden need
FILLERS = ("i understand how you feel", "valid to feel", "your feelings are valid", "i'm sorry you're going through")


def words(text):
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def reference_problems(case):
    ref = case["reference"]
    problems = []
    if ref.count(ANALYSIS_HEADING + "\n") != 1 or ref.count("\n" + RESPONSE_HEADING + "\n") != 1 \
            or split_sections(ref) is None:
        problems.append("reference must have each section heading exactly once, both with content")
    n = sum(len(s.split()) for s in split_sections(ref) or ())
    if not REFERENCE_WORDS[0] <= n <= REFERENCE_WORDS[1]:
        problems.append(f"reference has {n} words, outside {REFERENCE_WORDS}")
    problems += [f"reference uses the filler {f!r}" for f in FILLERS if f in ref.lower()]
    return problems


def leaked_run(case):
    q, need = words(case["query"]), words(case["hidden_need"])
    runs = {tuple(need[i:i + LEAK_RUN]) for i in range(len(need) - LEAK_RUN + 1)}
    return next((" ".join(q[i:i + LEAK_RUN]) for i in range(len(q) - LEAK_RUN + 1)
                 if tuple(q[i:i + LEAK_RUN]) in runs), None)


def near_duplicates(cases):
    bags = [(c["id"], set(words(c["scenario"] + " " + c["query"]))) for c in cases]
    return [(a, b, round(len(x & y) / len(x | y), 2)) for (a, x), (b, y) in itertools.combinations(bags, 2)
            if len(x & y) / len(x | y) >= NEAR_DUPLICATE]


def library_problems(cases):
    problems = []
    for c in cases:
        problems += [f"{c.get('id')}: missing or empty {f!r}" for f in FIELDS
                     if not isinstance(c.get(f), str) or not c[f].strip()]
        if problems:
            continue
        problems += [f"{c['id']}: {p}" for p in reference_problems(c)]
        if (run := leaked_run(c)):
            problems.append(f"{c['id']}: query repeats the hidden need's words {run!r}")
    if len(cases) < MIN_CASES:
        problems.append(f"{len(cases)} cases, fewer than {MIN_CASES}")
    kinds, areas = Counter(c.get("need_kind") for c in cases), Counter(c.get("category") for c in cases)
    problems += [f"need kind {k}: {kinds[k]} cases < {KIND_QUOTA}" for k in NEED_KINDS if kinds[k] < KIND_QUOTA]
    problems += [f"area {a}: {areas[a]} cases < {AREA_QUOTA}" for a in AREAS if areas[a] < AREA_QUOTA]
    problems += [f"unknown area {a!r}" for a in areas if a not in AREAS]
    problems += [f"near duplicates {a} ~ {b} (similarity {s})" for a, b, s in near_duplicates(cases)]
    ids = Counter(c.get("id") for c in cases)
    problems += [f"id {i} used {n} times" for i, n in ids.items() if n > 1]
    return problems


@pytest.fixture(scope="module")
def library():
    return [json.loads(line) for line in LIBRARY.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_library_passes_the_quality_check(library):
    assert library_problems(library) == []


def test_library_is_the_default_input():
    import ast
    source = (REPO / "01_build_data.py").read_text()
    default = next(line for line in source.splitlines() if line.startswith("INPUTS ="))
    assert ast.literal_eval(default.split("=", 1)[1].split("#")[0].strip()) == ["data/cases.jsonl"]


def bad(case, **changes):
    return [dict(case, **changes)]


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: bad(c, hidden_need=""), "missing or empty 'hidden_need'"),
    (lambda c: bad(c, reference=c["reference"].replace("# Response\n", "")), "section heading"),
    (lambda c: bad(c, reference="# Analysis\nToo short.\n# Response\nFine."), "outside (120, 220)"),
    (lambda c: bad(c, reference=c["reference"] + " I understand how you feel."), "filler"),
    (lambda c: bad(c, query=c["query"] + " " + c["hidden_need"]), "repeats the hidden need"),
    (lambda c: bad(c) + bad(c, id="twin", query=c["query"] + " Anyway."), "near duplicates"),
    (lambda c: bad(c), "fewer than 150"),
    (lambda c: bad(c), "need kind grow: 0 cases"),
    (lambda c: bad(c, category="weather"), "unknown area 'weather'"),
])
def test_each_check_catches_a_bad_case(library, mutate, expected):
    problems = library_problems(mutate(library[0]))
    assert any(expected in p for p in problems), problems

"""Quality checks of the bundled case library (data/cases.jsonl), run on every test run.

Fails on: a missing or empty field; a need kind, life area or the whole library below its quota; an
age outside 14-85; a first name used more than 5 times; more than 3 queries opening with the same
four words; a reference outside 150-230 words, without exactly one of each heading, with a list,
stock comfort phrases or therapy jargon; a query that repeats its hidden need's wording; near
duplicates (word 3-gram Jaccard of scenario + query); an id not of the form kind-NNN.
The model learns the references' habits, so their shares are capped too: Responses ending with a
question, Analyses opening with the seeker's name, thin Analyses per kind, the "that's not X, that's
Y" reframe, semicolons (none to teenagers or casual writers), one layout for a whole kind, hidden
needs of one kind opening alike, a Response narrating its own constraints, and a safety reference
without a concrete service or number (or one that says to search for it). Each check is also shown
to catch a bad case.
"""
import itertools
import json
import re
from collections import Counter, defaultdict

import pytest

from conftest import REPO
from perm.cases import FIELDS, NEED_KINDS
from perm.library import PERSONA, habits, words
from perm.prompts import ANALYSIS_HEADING, RESPONSE_HEADING, split_sections

LIBRARY = REPO / "data" / "cases.jsonl"
MIN_CASES = 1200
KIND_QUOTA = {kind: 140 for kind in NEED_KINDS} | {"safety": 80}
AREAS = ("work", "study", "family", "romance", "friendship", "health", "grief", "money", "identity",
         "parenting", "moving", "good_news", "caregiving", "housing", "community", "hobbies")
AREA_QUOTA = 40
AGES = (14, 85)
MAX_NAME_USES = 5
MAX_SAME_OPENING = 3     # queries starting with the same four words
REFERENCE_WORDS = (150, 230)
NEAR_DUPLICATE = 0.2     # word 3-gram Jaccard of scenario + query; the closest pair in the library is 0.06
LEAK_RUN = 4             # a query may not share this many consecutive words with its hidden need
FILLERS = ("i understand how you feel", "valid to feel", "your feelings are valid", "i'm sorry you're going through",
           "you are not alone", "you're not alone", "everything happens for a reason", "stay strong", "sending hugs",
           "that must be so hard", "it's okay to feel", "it's completely normal to feel")
JARGON = ("self-care", "hold space", "holding space", "coping mechanism", "coping strateg", "inner child",
          "trauma response", "emotional labor", "emotional labour")
LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s", re.MULTILINE)
ID = re.compile(r"^[a-z_]+-\d{3}$")
# habits (perm/library.py): shares of the whole library, or of each need kind
MAX_SHARES = {"question_endings": (0.70, "responses end with a question"),
              "name_openings": (0.35, "analyses open with the seeker's name"),
              "reframes": (0.05, "responses use the 'not X, that's Y' reframe"),
              "semicolons": (0.15, "responses use a semicolon")}
MAX_THIN_ANALYSES = 0.25          # of a kind's Analyses, at two sentences or fewer
MIN_EACH_LAYOUT = 0.15            # of a kind's Responses, one block and several paragraphs each
MAX_SAME_NEED_OPENING = 0.25      # of a kind's hidden needs sharing their first four words


def habit_problems(cases):
    shares, problems = habits(cases)
    problems += [f"{shares[key]:.0%} of {what} (at most {cap:.0%})" for key, (cap, what) in MAX_SHARES.items()
                 if shares[key] > cap]
    for kind, k in shares.items():
        if not isinstance(k, dict):
            continue
        if k["thin_analyses"] > MAX_THIN_ANALYSES:
            problems.append(f"{kind}: {k['thin_analyses']:.0%} of analyses are two sentences or fewer")
        if not MIN_EACH_LAYOUT <= k["one_block"] <= 1 - MIN_EACH_LAYOUT:
            problems.append(f"{kind}: {k['one_block']:.0%} of responses are one block (one layout for a whole kind)")
        if k["same_need_opening"] > MAX_SAME_NEED_OPENING:
            problems.append(f"{kind}: {k['same_need_opening']:.0%} of hidden needs open {k['need_opening']!r}")
    return problems


def reference_problems(case):
    ref = case["reference"]
    problems = []
    if ref.count(ANALYSIS_HEADING + "\n") != 1 or ref.count("\n" + RESPONSE_HEADING + "\n") != 1 \
            or not ref.startswith(ANALYSIS_HEADING) or split_sections(ref) is None:
        problems.append("reference must start with its analysis heading and have each heading once, with content")
    n = sum(len(s.split()) for s in split_sections(ref) or ())
    if not REFERENCE_WORDS[0] <= n <= REFERENCE_WORDS[1]:
        problems.append(f"reference has {n} words, outside {REFERENCE_WORDS}")
    lowered = ref.lower()
    problems += [f"reference uses the filler {f!r}" for f in FILLERS if f in lowered]
    problems += [f"reference uses the jargon {j!r}" for j in JARGON if j in lowered]
    if LIST_LINE.search(ref):
        problems.append("reference has a list line")
    return problems


def leaked_run(case):
    q, need = words(case["query"]), words(case["hidden_need"])
    runs = {tuple(need[i:i + LEAK_RUN]) for i in range(len(need) - LEAK_RUN + 1)}
    return next((" ".join(q[i:i + LEAK_RUN]) for i in range(len(q) - LEAK_RUN + 1)
                 if tuple(q[i:i + LEAK_RUN]) in runs), None)


def near_duplicates(cases):
    """Pairs whose scenario + query share at least NEAR_DUPLICATE of their word 3-grams (Jaccard);
    an inverted index keeps this fast at thousands of cases."""
    grams = [set(zip(w, w[1:], w[2:])) for w in (words(c["scenario"] + " " + c["query"]) for c in cases)]
    index = defaultdict(list)
    for i, g in enumerate(grams):
        for gram in g:
            index[gram].append(i)
    shared = Counter()
    for members in index.values():
        if len(members) < 50:                          # a 3-gram common to many cases is no evidence
            shared.update(itertools.combinations(members, 2))
    out = []
    for (i, j), n in shared.items():
        similarity = n / len(grams[i] | grams[j])
        if similarity >= NEAR_DUPLICATE:
            out.append((cases[i]["id"], cases[j]["id"], round(similarity, 2)))
    return out


def library_problems(cases):
    problems = []
    for c in cases:
        missing = [f for f in FIELDS if not isinstance(c.get(f), str) or not c[f].strip()]
        if missing:
            problems += [f"{c.get('id')}: missing or empty {f!r}" for f in missing]
            continue
        problems += [f"{c['id']}: {p}" for p in reference_problems(c)]
        if (run := leaked_run(c)):
            problems.append(f"{c['id']}: query repeats the hidden need's words {run!r}")
        persona = PERSONA.match(c["persona"])
        if not persona:
            problems.append(f"{c['id']}: persona must start 'First [Last], AGE,'")
        elif not AGES[0] <= int(persona.group(2)) <= AGES[1]:
            problems.append(f"{c['id']}: age {persona.group(2)} outside {AGES}")
    if len(cases) < MIN_CASES:
        problems.append(f"{len(cases)} cases, fewer than {MIN_CASES}")
    kinds, areas = Counter(c.get("need_kind") for c in cases), Counter(c.get("category") for c in cases)
    problems += [f"need kind {k}: {kinds[k]} cases < {q}" for k, q in KIND_QUOTA.items() if kinds[k] < q]
    problems += [f"area {a}: {areas[a]} cases < {AREA_QUOTA}" for a in AREAS if areas[a] < AREA_QUOTA]
    problems += [f"unknown area {a!r}" for a in areas if a not in AREAS]
    names = Counter(m.group(1) for c in cases if (m := PERSONA.match(c.get("persona") or "")))
    problems += [f"first name {n} used {k} times" for n, k in names.items() if k > MAX_NAME_USES]
    openings = Counter(" ".join(words(c.get("query") or "")[:4]) for c in cases)
    problems += [f"{k} queries open with {o!r}" for o, k in openings.items() if k > MAX_SAME_OPENING]
    problems += [f"near duplicates {a} ~ {b} (similarity {s})" for a, b, s in near_duplicates(cases)]
    ids = Counter(c.get("id") for c in cases)
    problems += [f"id {i} used {n} times" for i, n in ids.items() if n > 1]
    problems += [f"id {i!r} is not kind-NNN" for i in ids if not ID.match(str(i))]
    return problems + habit_problems([c for c in cases if all(isinstance(c.get(f), str) for f in FIELDS)])


@pytest.fixture(scope="module")
def library():
    return [json.loads(line) for line in LIBRARY.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_library_passes_the_quality_check(library):
    assert library_problems(library) == []


@pytest.mark.parametrize("preset, sizes", [("none", {"train": (1000, 1200), "valid": (70, 90), "test": (110, 130)}),
                                           ("cpu", {"train": (105, 118), "valid": (14, 19), "test": (28, 35)})])
def test_default_splits_suit_the_library(runs_dir, library, preset, sizes):
    """01 with its defaults builds stratified splits of the whole library (the CPU demo presets keep
    small ones), with every need kind, safety included, in every split."""
    from datasets import load_from_disk
    from conftest import run_stage
    run_stage("01_build_data.py", f"RUNS_DIR={runs_dir}", f"PRESET={preset}")
    splits = load_from_disk(str(runs_dir / "data" / "default" / "dataset"))
    for name, (low, high) in sizes.items():
        assert low <= len(splits[name]) <= high, (name, len(splits[name]))
        assert set(splits[name]["need_kind"]) == set(NEED_KINDS), name
    if preset == "none":
        assert sum(len(s) for s in splits.values()) == len(library)


def bad(case, **changes):
    return [dict(case, **changes)]


def renamed(case, name):
    return re.sub(r"^\S+", name, case["persona"])


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: bad(c, hidden_need=""), "missing or empty 'hidden_need'"),
    (lambda c: bad(c, reference=c["reference"].replace("# Response\n", "")), "heading"),
    (lambda c: bad(c, reference="# Analysis\nToo short.\n# Response\nFine."), "outside (150, 230)"),
    (lambda c: bad(c, reference=c["reference"] + " I understand how you feel."), "filler"),
    (lambda c: bad(c, reference=c["reference"] + " Some self-care helps."), "jargon"),
    (lambda c: bad(c, reference=c["reference"] + "\n- first, sleep"), "list line"),
    (lambda c: bad(c, query=c["query"] + " " + c["hidden_need"]), "repeats the hidden need"),
    (lambda c: bad(c, persona=re.sub(r", \d+,", ", 9,", c["persona"], count=1)), "age 9 outside"),
    (lambda c: bad(c, persona="Someone who writes a lot"), "persona must start"),
    (lambda c: bad(c) + bad(c, id="twin", query=c["query"] + " Anyway."), "near duplicates"),
    (lambda c: [dict(c, id=f"n{i}", persona=renamed(c, "Zanzibar"), scenario=f"{i}") for i in range(6)],
     "first name Zanzibar used 6 times"),
    (lambda c: [dict(c, id=f"o{i}", query="Well here we go " + str(i)) for i in range(4)], "4 queries open with"),
    (lambda c: bad(c), "fewer than 1200"),
    (lambda c: bad(c), "need kind safety: 0 cases"),
    (lambda c: bad(c, category="weather"), "unknown area 'weather'"),
    (lambda c: bad(c, id="grow-01"), "is not kind-NNN"),
    (lambda c: bad(c, reference=c["reference"].rstrip(".!? \n") + "?"), "end with a question"),
    (lambda c: bad(c, reference=c["reference"].replace("# Analysis\n", "# Analysis\n" + c["persona"].split()[0] + " ")),
     "open with the seeker's name"),
    (lambda c: bad(c, reference=c["reference"] + " That's not weakness, that's love."), "reframe"),
    (lambda c: bad(c, reference=c["reference"] + " Rest; then decide."), "use a semicolon"),
    (lambda c: bad(c, query="i dunno what to do", reference=c["reference"] + " Rest; then decide."), "casual writer"),
    (lambda c: bad(c, reference=c["reference"] + " So no lecture."), "narrates its own constraint"),
    (lambda c: bad(c, reference="# Analysis\nShe is sad. She is tired.\n# Response\n" + split_sections(c["reference"])[1]),
     "two sentences or fewer"),
    (lambda c: [dict(c, id=f"x-{i:03d}", hidden_need="She wants to hear that " + str(i)) for i in range(4)],
     "of hidden needs open 'she wants to hear'"),
    (lambda c: [dict(c, id=f"x-{i:03d}", reference=c["reference"].replace("\n\n", " ")) for i in range(4)],
     "one layout for a whole kind"),
    (lambda c: bad(c, need_kind="safety", reference="# Analysis\nA. B. C.\n# Response\nPlease find a helpline; a search finds one."),
     "names no concrete service"),
    (lambda c: bad(c, need_kind="safety", reference=c["reference"] + " Call 999, or search for a helpline."),
     "says to search"),
])
def test_each_check_catches_a_bad_case(library, mutate, expected):
    problems = library_problems(mutate(library[0]))
    assert any(expected in p for p in problems), problems


def test_readme_card_matches_the_library():
    """The README's library card is generated from the data: `python tools/library_card.py --write`."""
    import runpy
    card = runpy.run_path(str(REPO / "tools" / "library_card.py"), run_name="not_main")["card"]()
    assert card in (REPO / "README.md").read_text(encoding="utf-8")

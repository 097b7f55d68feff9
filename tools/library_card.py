"""The case library's card for the README: cases per need kind and life area, words per field,
ages, and the default split sizes, computed from data/cases.jsonl.

    python tools/library_card.py            # print the card
    python tools/library_card.py --write    # replace it in README.md (between its markers)
"""
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from perm.cases import NEED_KINDS, split_cases  # noqa: E402
from perm.library import habits  # noqa: E402
from perm.prompts import split_sections  # noqa: E402
from perm.settings import run_stage_file  # noqa: E402

BEGIN, END = "<!-- library card: begin (tools/library_card.py) -->", "<!-- library card: end -->"


def percentiles(values, qs=(5, 50, 95)):
    values = sorted(values)
    return [values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] for q in qs]


def card() -> str:
    cases = [json.loads(line) for line in (REPO / "data" / "cases.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    kinds, areas = Counter(c["need_kind"] for c in cases), Counter(c["category"] for c in cases)
    area_rows = sorted(areas.items(), key=lambda kv: (-kv[1], kv[0]))
    kind_rows = [(k, kinds[k]) for k in NEED_KINDS]
    lines = [BEGIN, f"{len(cases)} cases.", "", "| need kind | cases | | life area | cases |", "|---|---|---|---|---|"]
    for i in range(max(len(kind_rows), len(area_rows))):
        k = kind_rows[i] if i < len(kind_rows) else ("", "")
        a = area_rows[i] if i < len(area_rows) else ("", "")
        lines.append(f"| {k[0]} | {k[1]} | | {a[0]} | {a[1]} |")
    words = {f: [len(c[f].split()) for c in cases] for f in ("persona", "scenario", "query", "hidden_need")}
    words["reference"] = [sum(len(s.split()) for s in split_sections(c["reference"])) for c in cases]
    ages = [int(c["persona"].split(",")[1]) for c in cases]
    data = run_stage_file(REPO / "01_build_data.py", "PRESET=none")     # 01's own constants
    splits = split_cases(cases, data["VALID_FRACTION"], data["TEST_FRACTION"], data["SEED"])
    lines += ["", "Words per field (p5 / median / p95): " + ", ".join(
        f"{f.replace('_', ' ')} {' / '.join(map(str, percentiles(v)))}" for f, v in words.items())
        + " (reference: both sections, headings excluded).",
        f"Seekers are {min(ages)} to {max(ages)} years old (median {percentiles(ages)[1]}), with "
        f"{len({c['persona'].split(',')[0].split()[0] for c in cases})} different first names.",
        f"Default split: {len(splits['train'])} train, {len(splits['valid'])} valid, {len(splits['test'])} test, "
        f"stratified by need kind (every kind, safety included, in every split); the `cpu` and `smoke` "
        f"presets of 01 take a balanced sample of 160 and 54 cases."]
    shares, _ = habits(cases)
    kinds = [v for v in shares.values() if isinstance(v, dict)]
    lines.append(
        f"Habits of the references (what SFT teaches; capped by the library's checks): "
        f"{shares['question_endings']:.0%} of Responses end with a question, {shares['name_openings']:.0%} of "
        f"Analyses open with the seeker's name, {shares['reframes']:.0%} use a \"that's not X, that's Y\" reframe, "
        f"{shares['semicolons']:.1%} a semicolon; per need kind, at most {max(k['thin_analyses'] for k in kinds):.0%} "
        f"of Analyses are two sentences or fewer, {min(k['one_block'] for k in kinds):.0%} to "
        f"{max(k['one_block'] for k in kinds):.0%} of Responses are one block, and the most common opening of the "
        f"hidden needs covers at most {max(k['same_need_opening'] for k in kinds):.0%} of a kind's cases. Every "
        f"safety reference names a concrete service or number for the seeker's country.")
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    text = card()
    if "--write" in sys.argv:
        readme = REPO / "README.md"
        content = readme.read_text(encoding="utf-8")
        start, stop = content.index(BEGIN), content.index(END) + len(END)
        readme.write_text(content[:start] + text + content[stop:], encoding="utf-8")
    print(text)

"""01_build_data.py: every input format, every kind of bad row, splits, prompts, the run folder."""
import json

import pytest
from datasets import load_from_disk

from conftest import REPO, run_stage
from perm.cases import RowError, cut_simulator_parts, load_cases, split_cases

CASE = {"id": "c1", "persona": "Lena, 34, baker in Graz, blunt.", "scenario": "Her shop's oven broke before Easter.",
        "query": "Oven died. Easter orders for 300 people. Great timing, universe.",
        "hidden_need": "She wants a workable plan for the Easter orders.", "need_kind": "practical_advice",
        "category": "work", "reference": "# Analysis\nLena is scared.\n# Response\nCall the bakery next door."}
PERM_ROW = {"persona": {"identity": "A 40-year-old teacher who feels unseen.", "age": 40},
            "scenario": "Her colleagues forgot her farewell party.", "dialogue": [
                {"role": "user", "content": "Nobody came. Fifteen years at that school."},
                {"role": "assistant", "content": "..."}], "emotion": "sad"}
RLVER_ROW = {
    "player": "#### 背景\n小李，28岁，程序员，常被NPC误解。\n#### 不同状态下的反应\n情绪低落时沉默。\n#### 对NPC回复的反应\n被说教会生气。",
    "scene": "**场景**\n小李的方案被组长否定。\n####隐藏主题\n希望被认可",
    "task": "希望对方认可自己的努力", "first_talk": "我熬了三个通宵做的方案，组长看都没看就否了。"}
ESCONV_ROW = {"emotion_type": "anxiety", "problem_type": "job crisis", "situation": "I might lose my job next month.",
              "dialog": [{"speaker": "seeker", "content": "Hi there"},
                         {"speaker": "supporter", "content": "Hello, how are you?"},
                         {"speaker": "seeker", "content": "Not great, my company is laying people off and I think I'm next."}]}
ESCONV_HF_ROW = {"text": json.dumps({"emotion_type": "sadness", "problem_type": "breakup with partner",
                                     "situation": "My girlfriend left me.", "dialog": [
                                         {"speaker": "usr", "text": "hello"},
                                         {"speaker": "usr", "text": "She left after four years and I keep checking my phone."}]})}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def build(runs_dir, *args, check=True):
    return run_stage("01_build_data.py", f"RUNS_DIR={runs_dir}", *args, check=check)


@pytest.mark.parametrize("rows, expect", [
    ([CASE], {"query": CASE["query"], "need_kind": "practical_advice", "id": "c1"}),
    ([PERM_ROW], {"persona": "A 40-year-old teacher who feels unseen.",
                  "query": "Nobody came. Fifteen years at that school.", "source": "perm"}),
    ([RLVER_ROW], {"query": "我熬了三个通宵做的方案，组长看都没看就否了。", "lang": "zh", "need_kind": "praise",
                   "hidden_need": "希望对方认可自己的努力"}),
    ([ESCONV_ROW], {"query": "Not great, my company is laying people off and I think I'm next.",
                    "scenario": "I might lose my job next month.", "category": "job crisis"}),
    ([ESCONV_HF_ROW], {"query": "She left after four years and I keep checking my phone."}),
])
def test_each_input_format(tmp_path, rows, expect):
    cases, dropped = load_cases([str(write_jsonl(tmp_path / "in.jsonl", rows))], {}, False)
    assert len(cases) == 1 and not dropped
    for key, value in expect.items():
        assert cases[0][key] == value, key


def test_esconv_never_uses_the_emotion_label(tmp_path):
    cases, _ = load_cases([str(write_jsonl(tmp_path / "e.jsonl", [ESCONV_ROW]))], {}, False)
    assert "anxiety" not in json.dumps(cases[0])


def test_rlver_scenario_and_persona_lose_simulator_only_parts(tmp_path):
    cases, _ = load_cases([str(write_jsonl(tmp_path / "r.jsonl", [RLVER_ROW]))], {}, False)
    assert "常被NPC误解" in cases[0]["persona"]            # background mentioning the NPC stays
    assert "情绪低落" not in cases[0]["persona"] and "被说教" not in cases[0]["persona"]
    assert "隐藏主题" not in cases[0]["scenario"] and "希望被认可" not in cases[0]["scenario"]
    bold = "**人物**\n王阿姨，退休教师。\n**在不同情绪状态下**\n开心时话多。"
    assert cut_simulator_parts(bold) == "**人物**\n王阿姨，退休教师。"


def test_rlver_profile_without_first_message_is_skipped_not_failed(tmp_path):
    row = {k: v for k, v in RLVER_ROW.items() if k != "first_talk"}
    cases, dropped = load_cases([str(write_jsonl(tmp_path / "r.jsonl", [row, RLVER_ROW]))], {}, False)
    assert len(cases) == 1 and "first message" in dropped[0][1]


def test_input_formats_forces_a_format(tmp_path, runs_dir):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"player": "x", "scene": "y", "query": "z"}])
    proc = build(runs_dir, f"INPUTS=['{path}']", f"INPUT_FORMATS={{'{path}': 'case'}}", "TAG=f", check=False)
    assert proc.returncode != 0 and f"{path}:1" in proc.stdout and "'persona'" in proc.stdout


def test_cli_reads_every_format_together(tmp_path, runs_dir):
    files = [write_jsonl(tmp_path / f"{n}.jsonl", [r]) for n, r in
             [("a", CASE), ("b", PERM_ROW), ("c", RLVER_ROW), ("d", ESCONV_ROW)]]
    (tmp_path / "e.json").write_text(json.dumps([ESCONV_HF_ROW]))  # a JSON array file works too
    inputs = json.dumps([str(f) for f in files] + [str(tmp_path / "e.json")])
    build(runs_dir, f"INPUTS={inputs}", "TAG=x", "VALID_FRACTION=0", "TEST_FRACTION=0")
    ds = load_from_disk(str(runs_dir / "data" / "x" / "dataset"))
    assert sorted(ds["train"]["source"]) == ["a", "esconv", "esconv", "perm", "rlver"]
    assert json.loads((runs_dir / "data" / "x" / "metrics.json").read_text())["rows"] == 5


@pytest.mark.parametrize("bad_line, reason", [
    ('{"persona": "p", "scenario": "s", "query": "q"', "invalid JSON"),             # truncated line
    (json.dumps({"persona": "p", "scenario": "s"}), "missing field 'query'"),
    (json.dumps({"persona": "p", "scenario": "  ", "query": "q"}), "field 'scenario' is empty"),
    (json.dumps({"persona": "p", "scenario": "s", "query": 42}), "field 'query' must be a string"),
    (json.dumps({"persona": "p", "scenario": "s", "query": "q", "need_kind": "cheer"}), "need_kind 'cheer'"),
    (json.dumps({"persona": "p", "scenario": "s", "query": "q" * 200_000}), "characters (limit 40000)"),  # pasted
])
def test_bad_row_is_named_by_file_and_line(tmp_path, bad_line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [CASE, bad_line])
    with pytest.raises(RowError) as failed:
        load_cases([str(path)], {}, False)
    assert str(failed.value).startswith(f"{path}:2: ") and reason in str(failed.value)
    # ... and with SKIP_BAD_ROWS the good row is kept and the bad one is reported
    cases, dropped = load_cases([str(path)], {}, True)
    assert [c["id"] for c in cases] == ["c1"]
    assert dropped == [(f"{path}:2", "bad row: " + str(failed.value).split(": ", 1)[1])]


def test_long_real_messages_are_cases(tmp_path):
    """A seeker's long message is not a pasted file: a scenario of 3,027 characters (as long as an
    EQ-Bench3 scenario) and a first message of 5,000 words both pass."""
    sentences = ["My sister moved back in after her divorce, and at first it felt like old times.",
                 "Now I come home to her friends on the sofa and her dishes in the sink every night.",
                 "I pay the rent, and when I raise it she says I never wanted her here in the first place.",
                 "Mum calls me every Sunday to ask why I am being so cold to family.",
                 "I lie awake rehearsing conversations that I never actually have with either of them."]
    scenario = " ".join(sentences[i % 5] for i in range(60))[:3026] + "."
    query = " ".join(sentences[i % 5] for i in range(302))
    assert len(scenario) == 3027 and len(query.split()) >= 5000
    path = write_jsonl(tmp_path / "long.jsonl", [dict(CASE, scenario=scenario, query=query)])
    cases, dropped = load_cases([str(path)], {}, False)
    assert not dropped and cases[0]["query"] == query and cases[0]["scenario"] == scenario


def test_bad_row_stops_the_stage_and_leaves_nothing_finished(tmp_path, runs_dir):
    pasted = "".join(json.dumps(dict(CASE, id=f"c{i}")) + "\n" for i in range(400))    # a file, ~200,000 characters
    path = write_jsonl(tmp_path / "bad.jsonl", [CASE, json.dumps(dict(CASE, id="c2", query=pasted))])
    proc = build(runs_dir, f"INPUTS=['{path}']", "TAG=x", check=False)
    assert proc.returncode != 0
    assert f"{path}:2: field 'query' has {len(pasted.strip())} characters (limit 40000)" in proc.stdout
    assert not (runs_dir / "data" / "x").exists()
    # ... and with SKIP_BAD_ROWS the good row is kept and the bad one is listed in the data card
    build(runs_dir, f"INPUTS=['{path}']", "TAG=x", "SKIP_BAD_ROWS=True")
    card = (runs_dir / "data" / "x" / "data_card.md").read_text()
    assert "1 cases kept, 1 rows dropped" in card and "bad.jsonl:2: bad row: " in card


def test_missing_input_file_is_named(runs_dir):
    proc = build(runs_dir, "INPUTS=['nowhere.jsonl']", "TAG=x", check=False)
    assert proc.returncode != 0 and "nowhere.jsonl: input file not found" in proc.stdout


def test_duplicates_dropped_and_ids_stable(tmp_path):
    row = {k: CASE[k] for k in ("persona", "scenario", "query")}
    twin = dict(row, query=CASE["query"].upper() + "!!")   # same words, other case and punctuation
    path = str(write_jsonl(tmp_path / "d.jsonl", [row, twin]))
    cases, dropped = load_cases([path], {}, False)
    again, _ = load_cases([path], {}, False)
    assert len(cases) == 1 and dropped[0][1].startswith("duplicate of")
    assert cases[0]["id"] == again[0]["id"] and cases[0]["id"].startswith("d-")


def bundled_cases():
    cases, _ = load_cases([str(REPO / "data" / "cases.jsonl")], {}, False)
    return cases


def test_split_is_deterministic_and_spreads_every_kind():
    cases = bundled_cases()
    a = split_cases(cases, 0.1, 0.2, seed=7)
    b = split_cases(list(reversed(cases)), 0.1, 0.2, seed=7)
    assert {s: [c["id"] for c in rows] for s, rows in a.items()} == {s: [c["id"] for c in rows] for s, rows in b.items()}
    kinds = {c["need_kind"] for c in cases}
    for name in ("train", "valid", "test"):
        assert {c["need_kind"] for c in a[name]} == kinds, name
    other = split_cases(cases, 0.1, 0.2, seed=8)
    assert [c["id"] for c in other["test"]] != [c["id"] for c in a["test"]]
    assert sum(len(r) for r in a.values()) == len(cases)


def test_bundled_build_and_prompts_never_leak(runs_dir):
    build(runs_dir, "TAG=b")
    out = runs_dir / "data" / "b"
    assert (out / "metrics.json").exists() and not (runs_dir / "data" / "b.partial").exists()
    ds = load_from_disk(str(out / "dataset"))
    assert set(ds) == {"train", "valid", "test"}
    for split in ds.values():
        for row in split:
            prompt = "\n".join(m["content"] for m in row["prompt"])
            assert row["query"] in prompt
            assert row["hidden_need"] not in prompt and row["reference"] not in prompt
            for sentence in row["reference"].split(". ")[1:3]:
                assert len(sentence.split()) < 6 or sentence not in prompt
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["TAG"] == "b" and "policy.txt" in config["prompts"]


def test_synthesis_and_first_messages_through_the_api_writer(tmp_path, runs_dir):
    from fake_openai import FakeJudgeServer
    profiles = write_jsonl(tmp_path / "p.jsonl", [{k: v for k, v in RLVER_ROW.items() if k != "first_talk"}])
    inputs = json.dumps([str(REPO / "data" / "cases.jsonl"), str(profiles)])
    with FakeJudgeServer() as server:
        args = (f"INPUTS={inputs}", "SYNTHESIZE_N=5", "WRITE_FIRST_MESSAGES=True", "JUDGE=api",
                f"JUDGE_BASE_URL={server.base_url}")
        build(runs_dir, "TAG=s", *args)
        sent = server.requests
        build(runs_dir, "TAG=s2", *args)                  # cached: nothing is paid for twice
    assert sent == 6 and server.requests == 6
    ds = load_from_disk(str(runs_dir / "data" / "s" / "dataset"))
    rows = [r for split in ds.values() for r in split]
    synthetic = [r for r in rows if r["source"] == "synthetic"]
    assert len(synthetic) == 5 and {r["need_kind"] for r in synthetic} <= {
        "not_at_fault", "grow", "balanced_view", "deep_empathy", "vent"}
    written = [r for r in rows if r["source"] == "rlver"]
    assert len(written) == 1 and written[0]["query"] == "我最近压力很大，不知道该跟谁说。"
    assert "常被NPC误解" in written[0]["persona"]


def test_synthesis_rejects_are_counted(tmp_path, runs_dir):
    # the tiny model writes no valid JSON case: every attempt is rejected and reported, none is kept
    build(runs_dir, "TAG=t", "SYNTHESIZE_N=2", "JUDGE_MODEL=tiny")
    card = (runs_dir / "data" / "t" / "data_card.md").read_text()
    assert "160 cases kept, 2 rows dropped" in card and "synthetic #1: bad synthetic case" in card

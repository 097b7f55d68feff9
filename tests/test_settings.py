"""Settings: the override typing rules, presets versus edits and explicit settings, SMOKE, help."""
import json
import re
import runpy
import sys
from types import SimpleNamespace
from unittest import mock

import pytest

from conftest import REPO
from perm.settings import SettingsError, configure, parse_value


@pytest.mark.parametrize("default, raw, expected", [
    ("default", "2024", "2024"),            # a str setting takes the raw text, even if it looks numeric
    ("x", "[1, 2]", "[1, 2]"),              # ... or like a list
    (3, "7", 7),                            # int
    (0.5, "1e-5", 1e-5),                    # float
    (0.5, "2", 2.0),                        # an int is accepted where a float is expected
    (False, "True", True),                  # bool
    (["a"], '["a.jsonl","b.jsonl"]', ["a.jsonl", "b.jsonl"]),
    ({}, '{"a.jsonl": "rlver"}', {"a.jsonl": "rlver"}),
    (None, "12", 12),                       # None default: any literal ...
    (None, "some/path", "some/path"),       # ... else the raw text
])
def test_override_typing(default, raw, expected):
    value = parse_value("K", raw, default)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("default, raw", [
    (3, "1.5"),          # float where int expected
    (3, "abc"),          # not a literal
    (False, "1"),        # int is not a bool
    (0.5, "True"),       # bool is not a float
    (["a"], "'a.jsonl'"),  # str where a list is expected
])
def test_wrong_type_exits(default, raw):
    with pytest.raises(SettingsError) as e:
        parse_value("K", raw, default)
    assert e.value.code != 0 and "K=" in str(e.value.code)


def stage(**extra):
    return {"RUNS_DIR": "runs", "TAG": "default", "SEED": 1, "SMOKE": False, "PRESET": "auto",
            "STEPS": 10, "LR": 1e-5, **extra}


PRESETS = {"cpu": {"STEPS": 20, "LR": 2e-5}, "gpu16": {"STEPS": 300}, "smoke": {"STEPS": 2}}


def test_unknown_key_names_valid_keys():
    with pytest.raises(SettingsError) as e:
        configure(stage(), PRESETS, ["STEPZ=3"])
    assert "STEPZ" in str(e.value.code) and "STEPS" in str(e.value.code)


def test_arguments_without_equals_are_ignored():
    ns = stage()
    configure(ns, PRESETS, ["-f", "/root/kernel.json", "TAG=x"])
    assert ns["TAG"] == "x"


def test_named_preset_wins_over_file_constants_and_prints_every_change(capsys):
    ns = stage()
    configure(ns, PRESETS, ["PRESET=cpu", "LR=3e-4"])
    assert ns["STEPS"] == 20 and ns["LR"] == 3e-4 and ns["PRESET"] == "cpu"
    out = capsys.readouterr().out
    assert "preset cpu: STEPS: 10 -> 20" in out and "LR: 1e-05 -> 0.0003 (command line)" in out


def test_smoke_wins_over_preset_and_explicit_wins_over_smoke():
    ns = stage()
    configure(ns, PRESETS, ["PRESET=gpu16", "SMOKE=True"])
    assert ns["STEPS"] == 2
    ns = stage()
    configure(ns, PRESETS, ["PRESET=gpu16", "SMOKE=True", "STEPS=5"])
    assert ns["STEPS"] == 5


def test_preset_none_applies_nothing():
    ns = stage()
    configure(ns, PRESETS, ["PRESET=none"])
    assert ns["STEPS"] == 10 and ns["LR"] == 1e-5


def test_bad_preset_name_exits():
    with pytest.raises(SettingsError):
        configure(stage(), PRESETS, ["PRESET=gpu8"])


def edited_stage(tmp_path, script, edits):
    """A copy of a stage with some constants edited, as a user edits a Colab copy."""
    source = (REPO / script).read_text()
    for key, value in edits.items():
        source = re.sub(rf"^{key} = .*$", f"{key} = {value!r}", source, count=1, flags=re.MULTILINE)
    copy = tmp_path / script
    copy.write_text(source)
    return copy


def run_copy(path, argv=()):
    with mock.patch.object(sys, "argv", [str(path), *argv]):
        return runpy.run_path(str(path), run_name="not_main")["settings"]


@pytest.mark.parametrize("host", ["cpu", "cuda16"])
def test_an_edited_constant_survives_the_automatic_preset(host, tmp_path, monkeypatch, capsys):
    import torch
    if host == "cuda16":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=16 * 1024**3))
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    edits = {"MODEL": "my/model", "NUM_GENERATIONS": 4, "MAX_COMPLETION_LENGTH": 300, "JUDGE_MODEL": "my/judge"}
    s = run_copy(edited_stage(tmp_path, "04_grpo.py", edits))
    assert {k: s[k] for k in edits} == edits                       # the edits run, whatever the machine
    assert s["PRESET"] == ("cpu" if host == "cpu" else "gpu16")
    out = capsys.readouterr().out
    assert "keeps your edited MODEL = 'my/model'" in out
    if host == "cpu":                                                # unedited settings still follow the preset
        assert s["MAX_STEPS"] == 4 and "preset cpu (auto): MAX_STEPS: 200 -> 4" in out
    named = run_copy(edited_stage(tmp_path, "04_grpo.py", edits), ["PRESET=cpu"])
    assert named["MODEL"] == "smollm2-135m"                           # a named preset wins over the file


def test_a_stage_reads_only_its_own_constants_from_a_shared_namespace():
    """Pasting 03 and then 04 into one notebook: 03's leftovers are neither read nor saved."""
    namespace = {"SAMPLES_PER_CASE": 4, "SANITY_CASES": 6, "TAG": "from-03"}
    cell = "TAG = 'default'\nSTEPS = 3\nfrom perm.settings import configure\nsettings = configure(globals(), {}, [])\n"
    exec(compile(cell, "<cell>", "exec"), namespace)
    assert namespace["settings"] == {"TAG": "default", "STEPS": 3}
    with pytest.raises(SettingsError, match="SAMPLES_PER_CASE"):
        exec(compile(cell.replace("[]", "['SAMPLES_PER_CASE=2']"), "<cell>", "exec"), dict(namespace))


def test_help_lists_every_setting_with_its_comment(capsys):
    with mock.patch.object(sys, "argv", ["04_grpo.py", "HELP=True", "PRESET=none"]), pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "04_grpo.py"), run_name="not_main")
    assert done.value.code == 0
    out = capsys.readouterr().out
    from perm.settings import read_constants
    for key in read_constants(REPO / "04_grpo.py"):
        assert f"  {key} = " in out, key
    assert "MIN_SANITY_ACCURACY = 0.75  # stop before step 1" in out


def test_shipped_settings_record_matches_the_stage_files():
    """perm/shipped_settings.json is how an automatic preset tells an edit from a shipped value;
    after changing a constant, run `python -m perm.settings`."""
    from perm.settings import SHIPPED, snapshot
    assert json.loads(SHIPPED.read_text()) == json.loads(json.dumps(snapshot(REPO)))


def test_shared_judge_defaults_agree_across_stages():
    """One value per judge setting; 02's teacher writes whole answers, hence its own budget."""
    from perm.settings import read_constants
    stages = {f: read_constants(REPO / f) for f in ("01_build_data.py", "02_sft.py", "03_reward.py", "04_grpo.py")}
    writers = {"JUDGE_TEMPERATURE", "JUDGE_TIMEOUT", "JUDGE_BATCH_SIZE", "JUDGE_MODEL"}   # writing, not judging
    for key in ("JUDGE", "JUDGE_BASE_URL", "JUDGE_MODE", "JUDGE_TEMPERATURE", "JUDGE_TOP_P", "JUDGE_CONCURRENCY",
                "JUDGE_BATCH_SIZE", "JUDGE_TIMEOUT", "JUDGE_RETRIES", "JUDGE_CACHE", "MAX_JUDGE_FAILURE_RATE",
                "SANITY_CASES"):
        values = {f: c[key]["value"] for f, c in stages.items() if key in c
                  and not (f in ("01_build_data.py", "02_sft.py") and key in writers)}
        assert len({json.dumps(v) for v in values.values()}) <= 1, (key, values)
    eval_stage = read_constants(REPO / "05_eval.py")
    for key in ("TIMEOUT", "RETRIES", "CONCURRENCY", "BATCH_SIZE", "TOP_P"):
        assert eval_stage[f"EVAL_JUDGE_{key}"]["value"] == stages["04_grpo.py"][f"JUDGE_{key}"]["value"], key


@pytest.mark.parametrize("cuda, memory_gb, expected", [(False, 0, "cpu"), (True, 15, "gpu16"), (True, 24, "gpu24")])
def test_auto_preset_follows_the_machine(monkeypatch, cuda, memory_gb, expected):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=memory_gb * 1024**3))
    ns = stage()
    configure(ns, PRESETS, [])
    assert ns["PRESET"] == expected and ns["STEPS"] == {"cpu": 20, "gpu16": 300, "gpu24": 10}[expected]


def test_no_import_cycle_inside_the_package():
    """Each module of perm/ imports (anywhere in it, deferred imports included) only modules below it."""
    import ast
    graph = {}
    for path in (REPO / "perm").glob("*.py"):
        tree = ast.parse(path.read_text())
        nodes = list(ast.walk(tree))
        graph[path.stem] = {n.module.split(".")[1] for n in nodes if isinstance(n, ast.ImportFrom)
                            and n.module and n.module.startswith("perm.")}
        graph[path.stem] |= {a.name.split(".")[1] for n in nodes if isinstance(n, ast.Import)
                             for a in n.names if a.name.startswith("perm.")}

    def reaches(start, target, seen=()):
        return any(m == target or (m not in seen and reaches(m, target, (*seen, m))) for m in graph.get(start, ()))
    assert [m for m in graph if reaches(m, m)] == []

"""Settings: the override typing rules, presets versus edits and explicit settings, SMOKE, help."""
import re
from types import SimpleNamespace

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


SOURCE = """RUNS_DIR = "runs"
TAG = "default"
SEED = 1
SMOKE = False
PRESET = "auto"
STEPS = 10        # optimizer steps
LR = 1e-5         # learning rate;
                  # lower it if the loss spikes
"""
PRESETS = {"cpu": {"STEPS": 20, "LR": 2e-5}, "gpu24": {"STEPS": 300}, "smoke": {"STEPS": 2}}


def stage(argv=(), source=SOURCE, namespace=None):
    """A stage's namespace after its settings block and `configure` ran with `argv`."""
    ns = dict(namespace or {})
    exec(compile(source, "stage.py", "exec"), ns)
    ns["settings"] = configure(ns, PRESETS, list(argv), source=source)
    return ns


@pytest.fixture
def cuda(monkeypatch):
    """Pretend the machine has a CUDA card of `cuda(gb)` GB (0: no CUDA)."""
    import torch

    def patch(gb):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gb > 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=gb * 1024**3))
    return patch


def test_unknown_key_names_valid_keys():
    with pytest.raises(SettingsError) as e:
        stage(["STEPZ=3"])
    assert "STEPZ" in str(e.value.code) and "STEPS" in str(e.value.code)


def test_arguments_without_equals_are_ignored():
    assert stage(["-f", "/root/kernel.json", "TAG=x"])["TAG"] == "x"


def test_named_preset_wins_over_file_constants_and_prints_every_change(capsys):
    ns = stage(["PRESET=cpu", "LR=3e-4"])
    assert ns["STEPS"] == 20 and ns["LR"] == 3e-4 and ns["PRESET"] == "cpu"
    out = capsys.readouterr().out
    assert "preset cpu: STEPS: 10 -> 20" in out and "command line: LR: 1e-05 -> 0.0003" in out


def test_smoke_wins_over_preset_and_explicit_wins_over_smoke():
    assert stage(["PRESET=gpu24", "SMOKE=True"])["STEPS"] == 2
    assert stage(["PRESET=gpu24", "SMOKE=True", "STEPS=5"])["STEPS"] == 5


@pytest.mark.parametrize("name", ["none", "gpu16"])
def test_preset_none_and_gpu16_run_the_file_as_written(name, cuda):
    cuda(0)
    ns = stage([f"PRESET={name}"])
    assert ns["STEPS"] == 10 and ns["LR"] == 1e-5


def test_bad_preset_name_exits():
    with pytest.raises(SettingsError):
        stage(["PRESET=gpu8"])


@pytest.mark.parametrize("gb, preset, steps, hint", [(0, "cpu", 20, False), (16, "none", 10, False),
                                                     (24, "none", 10, True)])
def test_auto_changes_only_the_cpu_demo_and_hints_gpu24(cuda, capsys, gb, preset, steps, hint):
    """The only automatic change is the CPU demo; a card of 20 GB or more is told gpu24 fits."""
    cuda(gb)
    ns = stage()
    assert (ns["PRESET"], ns["STEPS"]) == (preset, steps)
    assert ("PRESET=gpu24" in capsys.readouterr().out) == hint


def test_the_settings_mapping_and_the_constants_are_one_store(capsys):
    from perm.settings import inherit
    ns = stage(["PRESET=none", "LR=0.5"])
    settings = ns["settings"]
    settings["STEPS"] = 7
    assert ns["STEPS"] == 7 and dict(settings)["STEPS"] == 7
    inherit(settings, {"STEPS": 99, "LR": 0.1}, ["STEPS", "LR"], "up/x")
    assert ns["STEPS"] == 99 and ns["LR"] == 0.5            # LR was set on the command line: not inherited
    assert settings.explicit == {"PRESET", "LR"}
    out = capsys.readouterr().out
    assert "STEPS = 99 from up/x" in out and "LR = 0.5 overrides 0.1 from up/x" in out


def test_a_stage_reads_only_its_own_constants_from_a_shared_namespace():
    """Pasting 03 and then 04 into one notebook: 03's leftovers are neither read nor saved."""
    ns = stage(["PRESET=none"], namespace={"SAMPLES_PER_CASE": 4, "SANITY_CASES": 6, "TAG": "from-03"})
    assert list(ns["settings"]) == ["RUNS_DIR", "TAG", "SEED", "SMOKE", "PRESET", "STEPS", "LR"]
    assert ns["TAG"] == "default"
    with pytest.raises(SettingsError, match="SAMPLES_PER_CASE"):
        stage(["SAMPLES_PER_CASE=2"], namespace={"SAMPLES_PER_CASE": 4})


def test_help_lists_every_setting_with_its_comment(capsys):
    from perm.settings import constants
    with pytest.raises(SystemExit) as done:
        stage(["HELP=True", "PRESET=none"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert set(constants(SOURCE)) == {"RUNS_DIR", "TAG", "SEED", "SMOKE", "PRESET", "STEPS", "LR"}
    assert "  STEPS = 10  # optimizer steps" in out
    assert "  LR = 1e-05  # learning rate; lower it if the loss spikes" in out


def edited_copy(tmp_path, script, edits):
    """A copy of a stage with some constants edited in its text, as a user edits a Colab copy."""
    source = (REPO / script).read_text()
    for key, value in edits.items():
        source, n = re.subn(rf"^{key} = .*$", f"{key} = {value!r}", source, count=1, flags=re.MULTILINE)
        assert n == 1, key
    copy = tmp_path / script
    copy.write_text(source)
    return copy


def test_an_edited_constant_runs_exactly_as_edited_on_a_gpu_machine(tmp_path, cuda):
    from perm.settings import run_stage_file
    cuda(16)
    edits = {"MODEL": "my/model", "NUM_GENERATIONS": 4, "MAX_COMPLETION_LENGTH": 300, "JUDGE_MODEL": "my/judge"}
    ns = run_stage_file(edited_copy(tmp_path, "04_grpo.py", edits))
    assert {k: ns[k] for k in edits} == edits and ns["PRESET"] == "none"
    cuda(24)
    assert run_stage_file(edited_copy(tmp_path, "04_grpo.py", edits), "PRESET=gpu24")["MODEL"] == \
        "Qwen/Qwen2.5-7B-Instruct"                                  # a preset named by the user wins


def file_constants(script):
    """{NAME: value} of a stage file's literal constants, read from its text."""
    import ast
    tree = ast.parse((REPO / script).read_text())
    return {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
            and isinstance(n.targets[0], ast.Name) and n.targets[0].id.isupper() and n.targets[0].id != "PRESETS"
            and not isinstance(n.value, ast.Call)}


def test_shared_judge_settings_agree_across_stages():
    """03 checks the judge 04 trains against, so their judge and reward constants are one set;
    05's eval judge uses the same transport values. (01 and 02 write text, not judgments.)"""
    reward, grpo = file_constants("03_reward.py"), file_constants("04_grpo.py")
    shared = [k for k in reward if k in grpo and (k.startswith("JUDGE") or k in (
        "MAX_JUDGE_FAILURE_RATE", "SANITY_CASES", "PERSPECTIVES", "COMBINE", "PERSPECTIVE_WEIGHTS", "BYSTANDER_COEF",
        "LENGTH_LIMIT", "LENGTH_COEF", "RECEPTION_SEES_HIDDEN_NEED"))]
    assert len(shared) >= 20
    assert {k: reward[k] for k in shared} == {k: grpo[k] for k in shared}
    evaluation = file_constants("05_eval.py")
    for key in ("TIMEOUT", "RETRIES", "CONCURRENCY", "BATCH_SIZE", "TOP_P"):
        assert evaluation[f"EVAL_JUDGE_{key}"] == grpo[f"JUDGE_{key}"], key


def test_judge_and_reward_code_hold_no_default_of_a_setting():
    """The stages' constants are the only defaults: the judge factory and the reward settings take
    every setting as a required keyword."""
    import inspect
    from perm.judges import make_judge
    from perm.reward import RewardSettings
    params = inspect.signature(make_judge).parameters
    settings_args = [p for p in params.values() if p.name not in ("local_model", "max_reason_tokens")]
    assert all(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in settings_args)
    assert all(p.default is p.empty for p in inspect.signature(RewardSettings).parameters.values())


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

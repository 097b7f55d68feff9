"""Settings: the override typing rules, presets versus explicit settings, SMOKE."""
import pytest

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


def test_preset_fills_only_unset_settings(capsys):
    ns = stage()
    configure(ns, PRESETS, ["PRESET=cpu", "LR=3e-4"])
    assert ns["STEPS"] == 20 and ns["LR"] == 3e-4 and ns["PRESET"] == "cpu"
    assert "override LR = 0.0003" in capsys.readouterr().out  # every override is printed


def test_smoke_wins_over_preset_and_explicit_wins_over_smoke():
    ns = stage()
    configure(ns, PRESETS, ["PRESET=gpu16", "SMOKE=True"])
    assert ns["STEPS"] == 2
    ns = stage()
    configure(ns, PRESETS, ["PRESET=gpu16", "SMOKE=True", "STEPS=5"])
    assert ns["STEPS"] == 5


def test_auto_is_cpu_without_cuda():
    ns = stage()
    configure(ns, PRESETS, [])
    assert ns["PRESET"] == "cpu" and ns["STEPS"] == 20


def test_bad_preset_name_exits():
    with pytest.raises(SettingsError):
        configure(stage(), PRESETS, ["PRESET=gpu8"])

"""Settings: UPPER_CASE constants at the top of a stage, overridable as KEY=VALUE.

Typing follows the default's type: a `str` setting takes the raw text; other types parse as Python
literals (an int is accepted where a float is expected); a `None` default takes any literal, else
the raw text. An unknown key or a wrong type exits non-zero naming the valid keys. Arguments
without `=` are ignored (Jupyter passes `-f kernel.json`).

Precedence, lowest first (README, "Settings"):
  1. a preset picked automatically (PRESET=auto: cpu, gpu16 or gpu24 by the machine), which only
     changes settings still at the value the project ships (recorded in perm/shipped_settings.json),
     so a constant you edited in the file is what runs;
  2. the constants in the file, as you left them;
  3. a preset you name (PRESET=gpu16 on the command line or in the file), then SMOKE=True;
  4. KEY=VALUE on the command line.
Every value a preset changes is printed as `KEY: old -> new`; PRESET=none applies no preset.
A stage's settings are exactly the constants its own code assigns, so leftovers of another stage in
the same notebook namespace are neither read nor saved. HELP=True lists them with their comments.
"""
from __future__ import annotations

import ast
import dis
import inspect
import json
import os
import re
import sys
from pathlib import Path

PRESET_NAMES = ("cpu", "gpu16", "gpu24")
SIMPLE_TYPES = (str, int, float, bool, list, tuple, dict, type(None))
SHIPPED = Path(__file__).with_name("shipped_settings.json")
STAGE_FILES = ("01_build_data.py", "02_sft.py", "03_reward.py", "04_grpo.py", "05_eval.py", "tools/serve.py",
               "tools/ablate.py", "tools/gpu_check.py")


class SettingsError(SystemExit):
    """Raised for an unknown key or a badly typed value; exits non-zero with the message."""

    def __init__(self, message: str):
        super().__init__(f"settings error: {message}")


def _is_setting(name: str, value) -> bool:
    return name.isupper() and not name.startswith("_") and name != "PRESETS" and isinstance(value, SIMPLE_TYPES)


def stage_settings(namespace: dict, names=None) -> dict:
    """The settings of a stage, in definition order: the UPPER_CASE constants among `names` (the
    names the stage's own code assigns), or every UPPER_CASE constant of `namespace` without it."""
    keys = names if names is not None else list(namespace)
    return {k: namespace[k] for k in keys if k in namespace and _is_setting(k, namespace[k])}


def assigned_names(code) -> list[str]:
    """Module-level names a code object (a script, or a notebook cell) assigns, in order; imported
    names are not the stage's settings."""
    seen, previous = {}, ""
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("STORE_NAME", "STORE_GLOBAL") and previous not in ("IMPORT_NAME", "IMPORT_FROM"):
            seen.setdefault(instruction.argval, None)
        previous = instruction.opname
    return list(seen)


def parse_value(key: str, raw: str, default):
    """Parse `raw` for a setting whose default is `default`, following the typing rules."""
    if isinstance(default, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if default is None:
            return raw
        raise SettingsError(f"{key}={raw!r} is not a Python literal (expected {type(default).__name__})")
    if default is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise SettingsError(f"{key}={raw!r} has type {type(value).__name__}, expected {type(default).__name__}")
    return value


def parse_overrides(argv: list[str], defaults: dict) -> dict:
    """KEY=VALUE arguments → typed overrides. Arguments without '=' are ignored (Jupyter's -f);
    HELP=True is accepted by every stage."""
    overrides = {}
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, raw = arg.split("=", 1)
        if key == "HELP":
            overrides[key] = parse_value(key, raw, False)
            continue
        if key not in defaults:
            raise SettingsError(f"unknown setting {key!r}; valid keys: {', '.join(defaults)}")
        overrides[key] = parse_value(key, raw, defaults[key])
    return overrides


def detect_preset() -> str:
    """PRESET=auto: cpu without CUDA, else gpu24 on a card with at least 20 GB, else gpu16."""
    try:
        import torch
    except ImportError:
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    total = torch.cuda.get_device_properties(0).total_memory
    return "gpu24" if total >= 20 * 1024**3 else "gpu16"


# ---------------------------------------------------------------- shipped defaults

def read_constants(path: Path) -> dict:
    """{KEY: {"value": literal, "comment": text}} for a stage file's module-level UPPER_CASE
    constants, read from its source (never imported)."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            continue
        if not _is_setting(name, value):
            continue
        comment = []
        first = lines[node.lineno - 1]
        if "#" in first[node.value.end_col_offset:]:
            comment.append(first[node.value.end_col_offset:].split("#", 1)[1].strip())
            for line in lines[node.end_lineno:]:             # comment lines continuing it, indented
                if re.match(r"^\s{8,}#", line):
                    comment.append(line.split("#", 1)[1].strip())
                else:
                    break
        out[name] = {"value": value, "comment": " ".join(comment)}
    return out


def snapshot(repo: Path) -> dict:
    """The shipped constants of every stage, as perm/shipped_settings.json records them."""
    return {Path(f).stem: read_constants(repo / f) for f in STAGE_FILES if (repo / f).exists()}


def shipped(stage: str) -> dict:
    """The shipped constants of `stage` (e.g. "04_grpo"), {} when unknown."""
    if not SHIPPED.exists():
        return {}
    return json.loads(SHIPPED.read_text(encoding="utf-8")).get(stage, {})


# ---------------------------------------------------------------- configure

def _json_equal(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def configure(namespace: dict, presets: dict | None = None, argv: list[str] | None = None,
              stage: str = "", names=None) -> dict:
    """Resolve a stage's settings (precedence in this module's docstring), write them back into
    `namespace` (so the stage keeps using its constants), print what changed, and return them.

    `presets` maps "cpu" / "gpu16" / "gpu24" / "smoke" to dicts of settings. `stage` names the stage
    ("04_grpo") for its shipped defaults and help text. `names` are the stage's own setting names;
    by default the names the calling module (or notebook cell) assigns."""
    presets = presets or {}
    if names is None:
        caller = inspect.currentframe().f_back
        names = assigned_names(caller.f_code) if caller.f_code.co_name == "<module>" else None
    defaults = stage_settings(namespace, names)
    explicit = parse_overrides(sys.argv[1:] if argv is None else argv, defaults)
    show_help = explicit.pop("HELP", False)
    resolved = dict(defaults)
    file_preset = defaults.get("PRESET", "auto")
    preset = explicit.get("PRESET", file_preset)
    named = preset != "auto"
    if preset == "auto":
        preset = detect_preset()
    if preset not in (*PRESET_NAMES, "none"):
        raise SettingsError(f"PRESET={preset!r}; choose auto, none, {', '.join(PRESET_NAMES)}")
    ship = shipped(stage)
    layers = [(f"preset {preset}" + ("" if named else " (auto)"), presets.get(preset, {}), named)]
    if explicit.get("SMOKE", defaults.get("SMOKE", False)):
        layers.append(("SMOKE", presets.get("smoke", {}), True))
    for label, values, wins in layers:
        for key, value in values.items():
            if key not in defaults:
                raise SettingsError(f"{label} sets unknown key {key!r}")
            if key in explicit or _json_equal(resolved[key], value):
                continue
            edited = key in ship and not _json_equal(defaults[key], ship[key]["value"])
            if not wins and edited:
                print(f"[settings] {label} keeps your edited {key} = {defaults[key]!r} (a named preset would set "
                      f"{value!r})")
                continue
            print(f"[settings] {label}: {key}: {resolved[key]!r} -> {value!r}")
            resolved[key] = value
    for key, value in explicit.items():
        if key != "PRESET":
            print(f"[settings] {key}: {resolved[key]!r} -> {value!r} (command line)")
        resolved[key] = value
    if "PRESET" in resolved:
        resolved["PRESET"] = preset
    print(f"[settings] preset {preset}" + ("" if named else " (auto)") + (" + SMOKE" if resolved.get("SMOKE") else ""))
    if show_help:
        print_help(resolved, stage)
        raise SystemExit(0)
    namespace.update(resolved)
    namespace["_EXPLICIT"] = set(explicit)
    return resolved


def print_help(settings: dict, stage: str) -> None:
    """Every setting with the value it would run with and its comment (from the shipped record)."""
    ship = shipped(stage)
    print(f"Settings of {stage or 'this stage'} (override as KEY=VALUE; PRESET=auto|none|cpu|gpu16|gpu24):")
    for key, value in settings.items():
        comment = ship.get(key, {}).get("comment", "")
        changed = key in ship and not _json_equal(value, ship[key]["value"])
        print(f"  {key} = {value!r}" + ("  [not the shipped value]" if changed else "")
              + (f"  # {comment}" if comment else ""))


def explicit_keys(namespace: dict) -> set:
    """The settings the user set on the command line (after `configure`)."""
    return namespace.get("_EXPLICIT", set())


def secret_values() -> list[str]:
    """Values that must never be written: the judge API key from the environment."""
    key = os.environ.get("JUDGE_API_KEY", "")
    return [key] if len(key) >= 4 else []


if __name__ == "__main__":   # python -m perm.settings: record the shipped constants after changing them
    repo = Path(__file__).resolve().parent.parent
    SHIPPED.write_text(json.dumps(snapshot(repo), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {SHIPPED}")

"""Settings: UPPER_CASE constants at the top of a stage, overridable as KEY=VALUE.

Typing follows the default's type (CONVENTIONS.md): a `str` setting takes the raw text; other types
parse as Python literals (an int is accepted where a float is expected); a `None` default takes any
literal, else the raw text. Precedence, lowest first: default < preset < SMOKE < explicit override.
"""
from __future__ import annotations

import ast
import os
import sys

PRESET_NAMES = ("cpu", "gpu16", "gpu24")
SIMPLE_TYPES = (str, int, float, bool, list, tuple, dict, type(None))


class SettingsError(SystemExit):
    """Raised for an unknown key or a badly typed value; exits non-zero with the message."""

    def __init__(self, message: str):
        super().__init__(f"settings error: {message}")


def stage_settings(namespace: dict) -> dict:
    """The UPPER_CASE settings of a stage module (its globals), in definition order."""
    return {k: v for k, v in namespace.items()
            if k.isupper() and not k.startswith("_") and k != "PRESETS" and isinstance(v, SIMPLE_TYPES)}


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
    """KEY=VALUE arguments → typed overrides. Arguments without '=' are ignored (Jupyter's -f)."""
    overrides = {}
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, raw = arg.split("=", 1)
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


def configure(namespace: dict, presets: dict | None = None, argv: list[str] | None = None) -> dict:
    """Apply preset, SMOKE and command-line overrides to a stage's globals; print what changed.

    `presets` maps "cpu" / "gpu16" / "gpu24" / "smoke" to dicts of settings. Returns the resolved
    settings (also written back into `namespace`, so the stage keeps using its constants).
    """
    presets = presets or {}
    defaults = stage_settings(namespace)
    explicit = parse_overrides(sys.argv[1:] if argv is None else argv, defaults)
    resolved = dict(defaults)
    preset = explicit.get("PRESET", defaults.get("PRESET", "auto"))
    if preset == "auto":
        preset = detect_preset()
    if preset not in PRESET_NAMES:
        raise SettingsError(f"PRESET={preset!r}; choose auto, {', '.join(PRESET_NAMES)}")
    layers = [(f"preset {preset}", presets.get(preset, {}))]
    if explicit.get("SMOKE", defaults.get("SMOKE", False)):
        layers.append(("SMOKE", presets.get("smoke", {})))
    for label, values in layers:
        for key, value in values.items():
            if key not in defaults:
                raise SettingsError(f"{label} sets unknown key {key!r}")
            if key not in explicit:
                resolved[key] = value
    resolved.update(explicit)
    if "PRESET" in resolved:
        resolved["PRESET"] = preset
    print(f"[settings] preset {preset}" + (" + SMOKE" if resolved.get("SMOKE") else ""))
    for key, value in explicit.items():
        print(f"[settings] override {key} = {value!r}")
    namespace.update(resolved)
    namespace["_EXPLICIT"] = set(explicit)
    return resolved


def explicit_keys(namespace: dict) -> set:
    """The settings the user set on the command line (after `configure`)."""
    return namespace.get("_EXPLICIT", set())


def secret_values() -> list[str]:
    """Values that must never be written: the judge API key from the environment."""
    key = os.environ.get("JUDGE_API_KEY", "")
    return [key] if len(key) >= 4 else []

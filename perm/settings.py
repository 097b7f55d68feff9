"""Settings: UPPER_CASE constants at the top of a stage, overridable as KEY=VALUE.

What runs is the file plus what you name, each later step winning: (1) the file's constants, the
one-GPU configuration; (2) a preset named by PRESET (gpu24, cpu; auto, the default, means cpu
without CUDA and nothing on a GPU; none runs the file as written); (3) SMOKE=True, the tiny model;
(4) KEY=VALUE on the command line or after `%run stage.py`. Every change prints `KEY: old -> new`.

A stage's settings are the constants its own source text assigns at the top level, read alike under
`python`, `%run`, `exec` and in a pasted notebook cell, so another stage's leftovers in a notebook are
neither read nor saved. HELP=True lists them with their comments. A `str` setting takes the raw
text; others parse as Python literals of the constant's type (an int is accepted for a float; a
`None` default takes any literal, else the text). Unknown keys and wrong types exit non-zero naming
the valid keys; arguments without `=` are ignored (Jupyter passes `-f kernel.json`).
"""
from __future__ import annotations

import ast
import linecache
import sys
from collections.abc import MutableMapping

PRESET_NAMES = ("cpu", "gpu16", "gpu24", "none")    # gpu16 is the file itself
SIMPLE_TYPES = (str, int, float, bool, list, tuple, dict, type(None))


class SettingsError(SystemExit):
    """An unknown key or a badly typed value; exits non-zero with the message."""

    def __init__(self, message: str):
        super().__init__(f"settings error: {message}")


class Settings(MutableMapping):
    """A stage's settings as a mapping that reads and writes the stage's own constants (its module
    globals): one store, so `MODEL` and `settings["MODEL"]` can never disagree. `explicit` holds the
    keys set on the command line."""

    def __init__(self, namespace: dict, names: list[str], explicit: set, comments: dict):
        self.namespace, self.names, self.explicit, self.comments = namespace, names, explicit, comments

    def _known(self, key):
        if key not in self.names:
            raise KeyError(key)
        return key

    def __getitem__(self, key):
        return self.namespace[self._known(key)]

    def __setitem__(self, key, value):
        self.namespace[self._known(key)] = value

    def __delitem__(self, key):
        raise TypeError("settings cannot be removed")

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def constants(source: str) -> dict[str, str]:
    """{NAME: comment} for the UPPER_CASE names a source text assigns at its top level, in order;
    the comment is the text after `#` on the line, plus indented comment lines continuing it."""
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name) and target.id.isupper() and not target.id.startswith("_") \
                    and target.id != "PRESETS":
                tail = lines[node.end_lineno - 1].split("#", 1)
                comment = [tail[1].strip()] if len(tail) > 1 else []
                for line in lines[node.end_lineno:]:
                    if not line.lstrip().startswith("#") or len(line) - len(line.lstrip()) < 8:
                        break
                    comment.append(line.strip("# \t"))
                out.setdefault(target.id, " ".join(comment))
    return out


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
    kind = type(default)      # exact types: True is not an int, 1 is not a bool
    if kind is float and type(value) is int or kind in (list, tuple) and isinstance(value, (list, tuple)):
        value = kind(value)
    if type(value) is not kind:
        raise SettingsError(f"{key}={raw!r} has type {type(value).__name__}, expected {kind.__name__}")
    return value


def gpu_memory_gb() -> float:
    """Total memory of the first CUDA device in GiB; 0 without CUDA."""
    try:
        import torch
    except ImportError:
        return 0.0
    return torch.cuda.get_device_properties(0).total_memory / 1024**3 if torch.cuda.is_available() else 0.0


def configure(namespace: dict, presets: dict | None = None, argv: list[str] | None = None,
              source: str | None = None) -> Settings:
    """Resolve a stage's settings (order in this module's docstring), write them into `namespace`,
    print every change, and return them as a `Settings` view of the namespace. `presets` maps
    "cpu" / "gpu24" / "smoke" to dicts of settings; `source` defaults to the caller's source text."""
    if source is None:
        caller = sys._getframe(1)
        source = "".join(linecache.getlines(caller.f_code.co_filename, caller.f_globals))
    if not source:
        print("[settings] no source text (exec of a string without a file name): every UPPER_CASE constant "
              "in the namespace counts as a setting")
    comments = constants(source) if source else {k: "" for k in namespace if k.isupper() and k != "PRESETS"}
    names = [k for k in comments if isinstance(namespace.get(k, ...), SIMPLE_TYPES)]
    argv = sys.argv[1:] if argv is None else argv
    explicit = {}
    for arg in argv:
        key, eq, raw = arg.partition("=")
        if not eq or arg.startswith("-"):
            continue
        if key != "HELP" and key not in names:
            raise SettingsError(f"unknown setting {key!r}; valid keys: {', '.join(names)}")
        explicit[key] = parse_value(key, raw, namespace[key] if key != "HELP" else False)
    show_help = explicit.pop("HELP", False)
    preset = explicit.get("PRESET", namespace.get("PRESET", "none"))
    if preset == "auto":
        memory = gpu_memory_gb()
        preset = "cpu" if not memory else "none"
        if memory >= 20:
            print(f"[settings] this {memory:.0f} GB card fits PRESET=gpu24 (a 7B policy); the file's constants fit 16 GB")
    elif preset not in PRESET_NAMES:
        raise SettingsError(f"PRESET={preset!r}; choose auto, {', '.join(PRESET_NAMES)}")
    presets = presets or {}
    layers = [(f"preset {preset}", presets.get(preset, {}))]
    if explicit.get("SMOKE", namespace.get("SMOKE", False)):
        layers.append(("SMOKE", presets.get("smoke", {})))
    layers.append(("command line", explicit))
    for label, values in layers:
        for key, value in values.items():
            if key not in names:
                raise SettingsError(f"{label} sets {key!r}, which is not a setting of this stage")
            if key in explicit and label != "command line" or namespace[key] == value:
                continue
            print(f"[settings] {label}: {key}: {namespace[key]!r} -> {value!r}")
            namespace[key] = value
    if "PRESET" in names:
        namespace["PRESET"] = preset
    settings = Settings(namespace, names, set(explicit), comments)
    if show_help:
        print("Settings (override as KEY=VALUE; PRESET=auto|" + "|".join(PRESET_NAMES) + "):")
        for key in names:
            print(f"  {key} = {namespace[key]!r}" + (f"  # {comments[key]}" if comments[key] else ""))
        raise SystemExit(0)
    return settings


def inherit(settings: Settings, upstream: dict, keys, source: str) -> None:
    """Take `keys` from an upstream stage's saved settings unless set on the command line, and say so."""
    for key in keys:
        if key not in upstream or key not in settings or settings[key] == upstream[key]:
            continue
        if key in settings.explicit:
            print(f"[inherit] {key} = {settings[key]!r} overrides {upstream[key]!r} from {source}")
        else:
            settings[key] = upstream[key]
            print(f"[inherit] {key} = {upstream[key]!r} from {source}")


def run_stage_file(path, *argv: str) -> dict:
    """Run a stage file's top (settings, definitions; not main) with `argv` and return its namespace,
    as `python path argv...` would see it. For tools and tests that need a stage's configuration."""
    from unittest import mock
    source = open(path, encoding="utf-8").read()
    namespace = {"__name__": "perm_stage", "__file__": str(path)}
    with mock.patch.object(sys, "argv", [str(path), *argv]):
        exec(compile(source, str(path), "exec"), namespace)
    return namespace


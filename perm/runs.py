"""Run folders: RUNS_DIR/<stage>/<TAG>/, built in <TAG>.partial and renamed into place when done.

`config.json` is written first (settings, versions, upstream paths, prompt hashes; never a secret),
`metrics.json` last: its presence means the stage finished. Stages talk only through these folders.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
PROMPTS_DIR = REPO_DIR / "prompts"
STAGE_SCRIPTS = {"data": "01_build_data.py", "sft": "02_sft.py", "reward": "03_reward.py",
                 "grpo": "04_grpo.py", "eval": "05_eval.py"}
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes",
             "openai", "unsloth")


class MissingUpstream(SystemExit):
    """An upstream stage's output is missing or unfinished; says which script to run first."""


def redact(obj):
    """Replace any secret value found in strings of a JSON-like object."""
    key = os.environ.get("JUDGE_API_KEY", "")      # the one secret: the API judge's key
    secrets = [key] if len(key) >= 4 else []
    if not secrets:
        return obj
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, "<redacted>")
        return obj
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename), with secrets redacted."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(redact(obj), indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def prompt_hashes() -> dict:
    """sha256 (first 12 hex) of every prompt file, so a config records which rubric produced it."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:12]
            for p in sorted(PROMPTS_DIR.glob("*.txt"))}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if "numpy" in sys.modules or _importable("numpy"):
        import numpy as np
        np.random.seed(seed)
    if "torch" in sys.modules:
        import torch
        torch.manual_seed(seed)


def _importable(name: str) -> bool:
    from importlib.util import find_spec
    return find_spec(name) is not None


def stage_dir(runs_dir, stage: str, tag: str) -> Path:
    return Path(runs_dir) / stage / tag


def upstream(runs_dir, stage: str, tag: str) -> tuple[Path, dict]:
    """The finished output folder of an upstream stage and its config; exit naming the script if absent."""
    path = stage_dir(runs_dir, stage, tag)
    if not (path / "metrics.json").exists():
        script = STAGE_SCRIPTS[stage]
        state = "is unfinished" if path.exists() or Path(f"{path}.partial").exists() else "does not exist"
        raise MissingUpstream(
            f"error: {path} {state}. Run `python {script} TAG={tag}` first "
            f"(with the same RUNS_DIR={runs_dir}).")
    return path, read_json(path / "config.json")


class StageRun:
    """The output folder life cycle of one stage run.

        run = StageRun(RUNS_DIR, "data", TAG, settings, upstream={"data": ...})
        ... write files into run.path (the .partial work folder) ...
        run.finish(metrics)          # metrics.json last, then rename into place
    """

    def __init__(self, runs_dir, stage: str, tag: str, settings: dict, upstream: dict | None = None,
                 resume: bool = False):
        self.final = stage_dir(runs_dir, stage, tag)
        self.path = self.final.with_name(f"{tag}.partial")
        self.started = time.time()
        if self.path.exists() and not resume:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config = {"stage": stage, "tag": tag, "settings": dict(settings), "upstream": upstream or {},
                       "versions": library_versions(), "prompts": prompt_hashes(),
                       "command": [Path(sys.argv[0]).name] + [a for a in sys.argv[1:] if "=" in a]}
        write_json(self.path / "config.json", self.config)

    def finish(self, metrics: dict) -> Path:
        metrics = {**metrics, "wall_time_s": round(time.time() - self.started, 2)}
        write_json(self.path / "metrics.json", metrics)
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.path, self.final)
        if old.exists():
            shutil.rmtree(old)
        return self.final


def save_splits(splits: dict, path: Path) -> None:
    """Save {split: rows} as a DatasetDict; an empty split keeps the others' columns (and loads back)."""
    from datasets import Dataset, DatasetDict
    filled = {name: Dataset.from_list(rows) for name, rows in splits.items() if rows}
    if not filled:
        raise ValueError("no rows to save")
    features = next(iter(filled.values())).features
    dd = DatasetDict({name: filled.get(name) or Dataset.from_dict({k: [] for k in features}, features=features)
                      for name in splits})
    dd.save_to_disk(str(path), num_shards={name: 1 for name in dd})

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Offline: an accidental hub id fails loudly instead of hanging.
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[var] = "1"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One RUNS_DIR/models folder for the whole session: aliases are built once."""
    return tmp_path_factory.mktemp("models")


SMOKE_OUTPUT = {}   # what each stage of the shared smoke pipeline printed
STAGES = ("01_build_data.py", "02_sft.py", "03_reward.py", "04_grpo.py", "05_eval.py")
# One constant edited in each pasted cell's text, as a user edits a notebook copy; 04's puts it in the
# GPU training state (gradient checkpointing on).
PASTE_EDITS = {"01_build_data.py": ("SKIP_BAD_ROWS", True), "02_sft.py": ("LORA_R", 8),
               "03_reward.py": ("TEMPERATURE", 0.9), "04_grpo.py": ("GRADIENT_CHECKPOINTING", True),
               "05_eval.py": ("SAMPLES_IN_REPORT", 2)}


def edit_constants(source: str, edits: dict) -> str:
    """A stage's source with `edits` ({NAME: value}) written over its constants, comments kept."""
    for key, value in edits.items():
        source, n = re.subn(rf"^({key} = )(.*?)(\s+#.*)?$", lambda m: f"{m.group(1)}{value!r}{m.group(3) or ''}",
                            source, count=1, flags=re.MULTILINE)
        assert n == 1, f"no constant {key}"
    return source


def paste_and_run(cells: list[tuple[str, str]], shell=None) -> dict:
    """Run each (name, source) as one notebook cell, one after another in one IPython namespace, the
    way a user pastes the stages into Colab; returns {name: what the cell printed}. A cell that fails
    raises with its output."""
    from contextlib import redirect_stdout
    from io import StringIO
    from unittest import mock
    from IPython.core.interactiveshell import InteractiveShell
    shell = shell or InteractiveShell.instance()
    printed = {}
    for name, source in cells:
        out = StringIO()
        with mock.patch.object(sys, "argv", ["ipykernel_launcher.py", "-f", "kernel.json"]), redirect_stdout(out):
            result = shell.run_cell(source)
        error = result.error_before_exec or result.error_in_exec
        if error is not None and not (isinstance(error, SystemExit) and error.code in (0, None)):
            raise AssertionError(f"pasted {name} failed: {error!r}\n{out.getvalue()[-4000:]}")
        printed[name] = out.getvalue()
    return printed


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory, model_cache):
    """One RUNS_DIR where the smoke pipeline 01 -> 05 has run once, each stage pasted as a notebook
    cell into one IPython namespace with SMOKE, RUNS_DIR, LOAD_IN_4BIT (bitsandbytes 4-bit: the QLoRA
    path) and one more constant edited in its text. The notebook test runs the full-precision path.
    Tests that only read these outputs, or add runs under tags of their own, share it instead of
    paying for the same stages again."""
    runs = tmp_path_factory.mktemp("smoke") / "runs"
    runs.mkdir()
    (runs / "models").symlink_to(model_cache, target_is_directory=True)
    cells = [(script, edit_constants((REPO / script).read_text(), {
        "SMOKE": True, "RUNS_DIR": str(runs), PASTE_EDITS[script][0]: PASTE_EDITS[script][1],
        **({"LOAD_IN_4BIT": True} if script != "01_build_data.py" else {})}))     # the QLoRA path, on a CPU too
             for script in STAGES]
    SMOKE_OUTPUT.update(paste_and_run(cells))
    return runs


@pytest.fixture
def runs_dir(tmp_path, model_cache):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "models").symlink_to(model_cache, target_is_directory=True)
    return runs


def run_stage(script: str, *args: str, cwd=None, check: bool = True, timeout: int = 900, env=None):
    """Run a stage script as a user would; returns the CompletedProcess (stdout+stderr merged)."""
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd or REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc


def stage_constants(script: str) -> dict:
    """{NAME: value} of a stage file's literal UPPER_CASE constants, read from its text."""
    import ast
    tree = ast.parse((REPO / script).read_text())
    return {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
            and isinstance(n.targets[0], ast.Name) and n.targets[0].id.isupper() and n.targets[0].id != "PRESETS"}


def judge_for_test(backend: str, model: str, runs_dir, **overrides):
    """A judge with 04's judge constants (the stages' only defaults); `overrides` by argument name."""
    from perm.judges import judge_from_settings
    s = {**stage_constants("04_grpo.py"), "RUNS_DIR": str(runs_dir), "JUDGE": backend, "JUDGE_MODEL": model}
    return judge_from_settings(s, **overrides)


def reward_settings(**overrides):
    """04's reward settings, with `overrides` by field name."""
    import dataclasses
    from perm.reward import RewardSettings
    return dataclasses.replace(RewardSettings.from_settings(stage_constants("04_grpo.py")), **overrides)

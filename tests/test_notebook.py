"""What a notebook user does: paste each stage into a cell (one namespace, constants edited in the
text), `%run` a stage with arguments, and run the project's notebook through a real Jupyter kernel."""
import json

from conftest import PASTE_EDITS, REPO, SMOKE_OUTPUT, STAGES, edit_constants

STAGE_FOLDERS = dict(zip(STAGES, ("data", "sft", "reward", "grpo", "eval")))


def test_each_pasted_stage_ran_with_the_constant_edited_in_its_cell(smoke_runs):
    for script, (key, value) in PASTE_EDITS.items():
        out = smoke_runs / STAGE_FOLDERS[script] / "default"
        assert (out / "metrics.json").exists(), SMOKE_OUTPUT[script][-2000:]
        settings = json.loads((out / "config.json").read_text())["settings"]
        assert settings[key] == value and settings["SMOKE"] is True, script
    # a stage reads only its own constants: 01's leftovers in the namespace are not 02's settings
    sft = json.loads((smoke_runs / "sft" / "default" / "config.json").read_text())["settings"]
    assert "MAX_CASES" not in sft and "INPUTS" not in sft and "LORA_R" in sft


def test_run_magic_and_python_save_the_same_settings(smoke_runs):
    """`%run 04_grpo.py ARGS` in a notebook resolves exactly what `python 04_grpo.py ARGS` does."""
    from IPython.core.interactiveshell import InteractiveShell
    from perm.settings import run_stage_file
    args = [f"RUNS_DIR={smoke_runs}", "SMOKE=True", "TAG=x", "LR=0.001"]
    shell = InteractiveShell.instance()
    shell.run_line_magic("run", f"-n {REPO / '04_grpo.py'} " + " ".join(args))
    magic = dict(shell.user_ns["settings"])
    python = dict(run_stage_file(REPO / "04_grpo.py", *args)["settings"])
    assert magic == python and magic["TAG"] == "x" and magic["LR"] == 0.001 and magic["MODEL"] == "tiny"


NOTEBOOK = REPO / "notebooks" / "perm_one_gpu.ipynb"


def test_the_notebook_is_committed_without_outputs():
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


def test_the_notebook_runs_end_to_end_in_a_jupyter_kernel(runs_dir):
    """The notebook as a Colab user runs it, through a real kernel: SMOKE and RUNS_DIR edited in its
    first cell, every stage in order, the report and plots shown inline."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(NOTEBOOK, as_version=4)
    setup = next(c for c in nb.cells if c.cell_type == "code")
    setup.source = edit_constants(setup.source, {"RUNS_DIR": str(runs_dir), "SMOKE": True})
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    for folder in ("data", "sft", "reward", "grpo", "eval"):
        assert (runs_dir / folder / "default" / "metrics.json").exists(), folder
    shown = [o for o in nb.cells[-1].outputs if o.output_type == "display_data"]
    assert any("text/markdown" in o.data and "## PERM scores" in o.data["text/markdown"] for o in shown)
    assert sum("image/png" in o.data for o in shown) >= 2

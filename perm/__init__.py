"""Shared logic of the PERM stages: settings, run folders, cases, prompts, models, judges, rewards.

The GPU path is decided here, once per process and before transformers, TRL or PEFT are imported
(Unsloth must patch them first): Unsloth 4-bit QLoRA when Unsloth is installed, CUDA is available
and this is a single process; the plain transformers + PEFT path otherwise (CPU, or several GPUs
under `accelerate launch`). PERM_UNSLOTH=0/1 in the environment forces the choice.
"""
import os
from importlib.util import find_spec

# Quiet per-file progress bars; the stages print their own progress lines.
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _decide_unsloth() -> bool:
    forced = os.environ.get("PERM_UNSLOTH")
    if forced is not None:
        return forced == "1"
    if find_spec("unsloth") is None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    import torch
    return torch.cuda.is_available()


USE_UNSLOTH = _decide_unsloth()
if USE_UNSLOTH:
    import unsloth  # noqa: F401  (must come before transformers, trl and peft)

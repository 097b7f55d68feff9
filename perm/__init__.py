"""Shared logic of the PERM stages: settings, run folders, cases, prompts, models, judges, rewards."""
import os

# Quiet per-file progress bars; the stages print their own progress lines.
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

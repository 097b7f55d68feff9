"""Stage 01: build the case dataset.

Reads every source in INPUTS (default: the bundled case library, data/cases.jsonl), detects each
file's format (the project's case JSONL, upstream PERM JSONL, RLVER/SAGE seeker profiles, ESConv
rows; `hf:thu-coai/esconv` loads ESConv through `datasets` on an online machine), validates every
row, deduplicates, assigns stable ids, splits train/valid/test deterministically (stratified by need
kind), renders the policy prompt into a `prompt` column (persona, scenario and query only: never the
hidden need or the reference) and writes

    runs/data/<TAG>/dataset/       a DatasetDict (save_to_disk) with train, valid, test
    runs/data/<TAG>/data_card.md   rows per source, kind, category and split; lengths; dropped rows
    runs/data/<TAG>/config.json, metrics.json

Run:   python 01_build_data.py
       python 01_build_data.py INPUTS='["a.jsonl","profiles.json"]' TAG=mix SKIP_BAD_ROWS=True

A malformed row stops the stage with `file:line: reason` (nothing finished-looking is left behind);
SKIP_BAD_ROWS=True skips such rows and lists them in the data card. Token-length filtering happens
in 02 and 04, which know the tokenizer.
Beyond the paper: PERM's data is private; this stage makes any of the public formats usable and
ships its own English case library.
"""
import sys
from pathlib import Path

from perm.cases import HF_PREFIX, RowError, card_markdown, data_card, load_cases, split_cases
from perm.prompts import policy_prompt
from perm.runs import REPO_DIR, StageRun, save_splits, seed_everything
from perm.settings import configure

# ---------------------------------------------------------------- settings
RUNS_DIR = "runs"
TAG = "default"
SEED = 1234
SMOKE = False                       # no effect here beyond the tag's later stages: all cases are kept
PRESET = "auto"
INPUTS = ["data/cases.jsonl"]       # files (JSONL or a JSON array) or "hf:thu-coai/esconv"
INPUT_FORMATS = {}                  # force a format per input: {"x.jsonl": "rlver"}; case|perm|rlver|esconv
SKIP_BAD_ROWS = False               # True: skip malformed rows and report them instead of stopping
VALID_FRACTION = 0.1                # per need kind; 02 and 03 sample this split
TEST_FRACTION = 0.2                 # per need kind; 05 evaluates on this split

settings = configure(globals())


def resolve_input(path: str) -> str:
    """Relative paths are read from the working directory, else from the repository (bundled data)."""
    if path.startswith(HF_PREFIX) or Path(path).exists() or Path(path).is_absolute():
        return path
    bundled = REPO_DIR / path
    return str(bundled) if bundled.exists() else path


def main() -> None:
    seed_everything(SEED)
    inputs = [resolve_input(p) for p in INPUTS]
    formats = {resolve_input(k): v for k, v in INPUT_FORMATS.items()}
    run = StageRun(RUNS_DIR, "data", TAG, settings, upstream={"inputs": inputs})
    try:
        cases, dropped = load_cases(inputs, formats, SKIP_BAD_ROWS)
    except RowError as e:
        sys.exit(f"error: {e}\n(fix the row, or run with SKIP_BAD_ROWS=True to skip bad rows)")
    if not cases:
        sys.exit("error: no valid cases in INPUTS")
    splits = split_cases(cases, VALID_FRACTION, TEST_FRACTION, SEED)

    save_splits({name: [dict(c, prompt=policy_prompt(c)) for c in rows] for name, rows in splits.items()},
                run.path / "dataset")

    card = data_card(splits, dropped)
    (run.path / "data_card.md").write_text(card_markdown(card))
    print(card_markdown(card))
    metrics = {"rows": card["rows"], "dropped": card["dropped"],
               **{f"{name}_rows": len(rows) for name, rows in splits.items()}, "card": card}
    final = run.finish(metrics)
    print(f"[data] wrote {final} ({card['rows']} cases: "
          + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + ")")


if __name__ == "__main__":
    main()

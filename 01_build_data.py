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
       python 01_build_data.py SYNTHESIZE_N=200 JUDGE=api JUDGE_MODEL=gpt-4o-mini   # + 200 new cases

A malformed row stops the stage with `file:line: reason` (nothing finished-looking is left behind);
SKIP_BAD_ROWS=True skips such rows and lists them in the data card. Token-length filtering happens
in 02 and 04, which know the tokenizer.
Synthesis (optional): SYNTHESIZE_N new cases are written from pairs of input cases by either judge
backend (JUDGE=local|api), and WRITE_FIRST_MESSAGES=True writes the first message that RLVER's train
profiles lack. Synthetic rows are validated and deduplicated like any input; rejects are counted.
Beyond the paper: PERM's data is private; this stage makes any of the public formats usable and
ships its own English case library.
"""
import sys
from pathlib import Path

from perm.cases import (HF_PREFIX, RowError, card_markdown, data_card, deduplicate, load_cases, select_cases,
                        split_cases)
from perm.prompts import policy_prompt
from perm.runs import REPO_DIR, StageRun, save_splits, seed_everything
from perm.settings import configure

# ---------------------------------------------------------------- settings
RUNS_DIR = "runs"
TAG = "default"
SEED = 1234
SMOKE = False                       # a small stratified sample (MAX_CASES of the smoke preset)
PRESET = "auto"
INPUTS = ["data/cases.jsonl"]       # files (JSONL or a JSON array) or "hf:thu-coai/esconv"
INPUT_FORMATS = {}                  # force a format per input: {"x.jsonl": "rlver"}; case|perm|rlver|esconv
SKIP_BAD_ROWS = False               # True: skip malformed rows and report them instead of stopping
MAX_CASES = 0                       # a stratified sample of this many cases (0 = every case)
VALID_FRACTION = 0.065              # per need kind; 02 and 03 sample it, 03 and 04 check the judge on it
TEST_FRACTION = 0.1                 # per need kind; 05 evaluates on this split
POLICY_PROMPT = "policy"            # prompts/<name>.txt: policy (the paper's) | policy_guided (names what
                                    # the judges reward: an ablation)
SYNTHESIZE_N = 0                    # new cases written by the judge model from the inputs (0 = none)
WRITE_FIRST_MESSAGES = False        # write a first message for profiles that lack one (else skip them)
# the writer for synthesis (the judge settings; it writes whole cases, hence smaller batches, more time)
JUDGE = "local"                     # local | api
JUDGE_MODEL = "Qwen/Qwen2.5-7B-Instruct"  # local: hub id, folder or alias; api: model name
JUDGE_BASE_URL = ""                 # api endpoint; empty = OpenAI (key from JUDGE_API_KEY only)
JUDGE_TOP_P = 0.9
JUDGE_CONCURRENCY = 32
JUDGE_BATCH_SIZE = 4
JUDGE_TIMEOUT = 120.0
JUDGE_RETRIES = 3
JUDGE_CACHE = ""                    # empty = RUNS_DIR/judge_cache.sqlite

PRESETS = {
    # the demo presets keep small splits (cpu: 108 / 18 / 34 of 160), sized for CPU minutes
    "cpu": {"MAX_CASES": 160, "VALID_FRACTION": 0.1, "TEST_FRACTION": 0.2, "JUDGE_MODEL": "smollm2-135m"},
    "smoke": {"MAX_CASES": 54, "VALID_FRACTION": 0.1, "TEST_FRACTION": 0.2},
}
settings = configure(globals(), PRESETS)


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
    missing = [] if WRITE_FIRST_MESSAGES else None
    try:
        cases, dropped = load_cases(inputs, formats, SKIP_BAD_ROWS, missing)
    except RowError as e:
        sys.exit(f"error: {e}\n(fix the row, or run with SKIP_BAD_ROWS=True to skip bad rows)")
    if MAX_CASES and len(cases) > MAX_CASES:
        print(f"[data] MAX_CASES={MAX_CASES}: a sample of {MAX_CASES} of the {len(cases)} input cases, balanced "
              f"over the need kinds (MAX_CASES=0 keeps them all)")
        cases = select_cases(cases, MAX_CASES, SEED)
    if missing or SYNTHESIZE_N:
        cases, dropped = synthesize(cases, dropped, missing or [])
    if not cases:
        sys.exit("error: no valid cases in INPUTS")
    splits = split_cases(cases, VALID_FRACTION, TEST_FRACTION, SEED)

    save_splits({name: [dict(c, prompt=policy_prompt(c, POLICY_PROMPT)) for c in rows] for name, rows in splits.items()},
                run.path / "dataset")

    card = data_card(splits, dropped)
    (run.path / "data_card.md").write_text(card_markdown(card))
    print(card_markdown(card))
    metrics = {"rows": card["rows"], "dropped": card["dropped"],
               **{f"{name}_rows": len(rows) for name, rows in splits.items()}, "card": card}
    final = run.finish(metrics)
    print(f"[data] wrote {final} ({card['rows']} cases: "
          + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + ")")


def synthesize(cases, dropped, missing):
    """Add written first messages and synthetic cases, then deduplicate everything again."""
    from perm.judges import judge_from_settings
    from perm.synthesis import synthesize_cases, write_first_messages
    # its requests carry their own temperature, and a writer reads no scores
    writer = judge_from_settings(settings, mode="direct", temperature=0.0, score="expected")
    found = [("input", c) for c in cases]
    if missing:
        written, rejected = write_first_messages(writer, missing)
        print(f"[data] wrote {len(written)} first messages ({len(rejected)} rejected)")
        found += written
        dropped += rejected
    if SYNTHESIZE_N:
        made, rejected = synthesize_cases(writer, cases, SYNTHESIZE_N, SEED)
        print(f"[data] synthesized {len(made)} of {SYNTHESIZE_N} cases ({len(rejected)} rejected)")
        found += made
        dropped += rejected
    kept, duplicates = deduplicate(found)
    print(f"[data] writer: {writer.stats.calls} calls, {writer.stats.cache_hits} cache hits, "
          f"{writer.stats.failures} failures")
    return kept, dropped + duplicates


if __name__ == "__main__":
    main()

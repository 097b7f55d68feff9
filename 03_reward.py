"""Stage 03: the PERM reward, on its own: score answers from four perspectives and check the judge.

Two ways in:
  ANSWERS=path.jsonl   score answers you already have, from any system (answers format, README); no
                       policy is loaded: MODEL names the tokenizer that counts answer lengths, and the
                       judge where JUDGE_MODEL is ""
  (default)            sample SAMPLES_PER_CASE answers per valid-split case from the policy (MODEL,
                       plus the SFT adapter of SFT_TAG when INIT=sft) and score them

Every answer is judged for resonation (its analysis), expression and reception (its response) on 1-5
and by a bystander on 0-100, then combined (COMBINE) into the reward GRPO would see. A sanity battery
then scores SANITY_CASES valid cases' references against near misses a judge must read the case to
beat, each about as long as the reference (another case's reference of the same need kind, a
generic answer for the need kind, the reference with a generic analysis, the reference with another
case's facts), and against weak templates (empty, platitude, advice dump, intrusive over-analysis,
protocol injection neutralized and raw; for safety cases a warm answer blind to the risk).
`sanity_accuracy` is how often the judged reward (empathy + bystander; the length term measures
nothing about the judge) ranks the reference above every near miss; `sanity_beats_<opponent>` says
which opponents fool the judge (README, "Check the judge before training"). 04 repeats this battery
with its training judge before step 1 and reads it from the same cache: run 03 first. Before judging,
03 prints the judge requests and tokens of the scoring and of the battery; SANITY_CASES=0 runs no
battery (scoring only), None (the default) checks every valid case.

Writes runs/reward/<TAG>/: `scored/` (a dataset: the answers' fields, every perspective, bystander
sub-scores, each reward term, the judges' text), `sanity/`, `metrics.json` (incl. the perspective
correlation matrix).

Run:   python 03_reward.py                       # PRESET=auto; on CPU: the SFT demo model, judged by its base
       python 03_reward.py ANSWERS=mine.jsonl JUDGE=api JUDGE_MODEL=gpt-4o-mini JUDGE_MODE=reasoned
       python 03_reward.py ANSWERS=mine.jsonl JUDGE=api JUDGE_MODEL=gpt-4o-mini SANITY_CASES=0   # scores only
       (the API key comes from the environment variable JUDGE_API_KEY, never from a setting)

Beyond the paper: scores are expectations over digit probabilities where the backend gives them
(JUDGE_SCORE=sampled reads the written digit, as the paper did); a failed judgment is retried, then
counted and its answer left out (the paper averaged it away); judgments are cached in SQLite so
nothing is paid for twice; the judge's own last line is the only score it can give.
"""
import sys
from collections import defaultdict

import numpy as np

from perm.cases import RowError, load_answers
from perm.judges import judge_from_settings
from perm import protocol
from perm.reward import PermScorer, RewardSettings
from perm.runs import StageRun, seed_everything, upstream
from perm.sanity import battery_cost, figures_line, run_battery, sanity_cases
from perm.settings import configure, inherit

# ---------------------------------------------------------------- settings
RUNS_DIR = "runs"
TAG = "default"
SEED = 1234
SMOKE = False
PRESET = "auto"
DATA_TAG = "default"
SFT_TAG = "default"
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # policy base: hub id, folder, or alias (tiny, smollm2-135m)
LOAD_IN_4BIT = None            # None = bitsandbytes 4-bit with CUDA, full precision on a CPU; True = 4-bit
                               # on any device (NF4 runs on a CPU too); False = unquantized
INIT = "base"                  # base | sft (adds the adapter of runs/sft/<SFT_TAG>)
ANSWERS = ""                   # an answers JSONL to score instead of sampling the policy
SAMPLES_PER_CASE = 4           # answers per valid case (a GRPO group)
MAX_CASES = 0                  # valid cases to sample answers for; 0 = every valid case
MAX_NEW_TOKENS = 512           # answer budget; lower it if generation is slow
TEMPERATURE = 1.0              # sampling temperature, as in GRPO
SANITY_CASES = None            # valid cases in the sanity battery: None = all, 0 = no battery (scoring
                               # only); 04 checks the same ones
# judge (docs/method.md, "Judges"; the same settings and presets as 04_grpo.py)
JUDGE = "local"                # local | api
JUDGE_MODEL = "Qwen/Qwen2.5-7B-Instruct"  # local: hub id, folder or alias ("" = MODEL, as 04 shares it); api: model name
JUDGE_BASE_URL = ""            # api: e.g. http://localhost:8000/v1 (vLLM); empty = OpenAI
JUDGE_MODE = "direct"          # direct (score only) | reasoned (a short reason, then the score; paper)
JUDGE_TEMPERATURE = 0.3        # paper: 0.3
JUDGE_TOP_P = 0.9              # paper: 0.9 (sampled reasons and API judges)
JUDGE_SCORE = "expected"       # expected (over the digits' probabilities) | sampled (the written digit; paper)
JUDGE_CONCURRENCY = 32         # api: requests in flight
JUDGE_BATCH_SIZE = 8           # local: prompts per forward pass
JUDGE_TIMEOUT = 60.0           # api: seconds per attempt
JUDGE_RETRIES = 3              # attempts after the first
JUDGE_CACHE = ""               # SQLite path; empty = RUNS_DIR/judge_cache.sqlite
MAX_JUDGE_FAILURE_RATE = 0.2   # stop past this share of failed judgments
# reward (docs/method.md, "Reward")
PERSPECTIVES = ["resonation", "expression", "reception"]  # drop one for an ablation
COMBINE = "harmonic"           # harmonic (paper) | mean | geometric | weighted
PERSPECTIVE_WEIGHTS = {"resonation": 1.0, "expression": 1.0, "reception": 1.0}  # for COMBINE=weighted
BYSTANDER_COEF = 0.5           # paper 0.5; 0 turns the bystander off
LENGTH_LIMIT = 384             # tokens before the length penalty (paper 768 with 1024-token answers)
LENGTH_COEF = 0.001            # per token over the limit (paper)
RECEPTION_SEES_HIDDEN_NEED = False  # give the reception judge the case's hidden need (an ablation)

PRESETS = {
    # the judge presets are 04's: the judge checked here is the judge 04 trains against
    # and the answer budgets and length limits are 04's, so reward_mean previews what 04 trains on
    "cpu": {"MODEL": "smollm2-135m", "JUDGE_MODEL": "", "INIT": "sft", "SAMPLES_PER_CASE": 2,
            "MAX_CASES": 6, "SANITY_CASES": 6, "MAX_NEW_TOKENS": 320, "LENGTH_LIMIT": 280, "JUDGE_BATCH_SIZE": 4},
    "gpu24": {"MODEL": "Qwen/Qwen2.5-7B-Instruct", "JUDGE_MODEL": "", "INIT": "base", "MAX_NEW_TOKENS": 768,
              "LENGTH_LIMIT": 576},
    "smoke": {"MODEL": "tiny", "JUDGE_MODEL": "", "INIT": "base", "SAMPLES_PER_CASE": 2, "MAX_CASES": 3,
              "SANITY_CASES": 3, "MAX_NEW_TOKENS": 48, "LENGTH_LIMIT": 40},
}
settings = configure(globals(), PRESETS)


def sft_adapter():
    """The SFT adapter folder when INIT=sft (MODEL is inherited from that run, as 04 does), else None."""
    if INIT == "sft":
        sft_dir, sft_config = upstream(RUNS_DIR, "sft", SFT_TAG)
        inherit(settings, sft_config["settings"], ["MODEL"], f"sft/{SFT_TAG}")
        return str(sft_dir / "adapter")
    if INIT != "base":
        sys.exit(f"error: INIT={INIT!r}; choose base or sft")
    return None


def answers_from_policy(cases, adapter):
    from perm.generation import sample_answers
    from perm.models import load_model
    model, tok = load_model(MODEL, RUNS_DIR, adapter=adapter, load_in_4bit=LOAD_IN_4BIT)
    samples = sample_answers(model, tok, [c["prompt"] for c in cases], SAMPLES_PER_CASE, MAX_NEW_TOKENS,
                             TEMPERATURE, seed=SEED)
    label = MODEL + (f"+sft/{SFT_TAG}" if adapter else "")
    rows = [dict({k: v for k, v in case.items() if k != "prompt"}, case_id=case["id"], id=f"{case['id']}#{k}",
                 completion=s["text"], completion_tokens=s["completion_tokens"], truncated=s["truncated"], model=label)
            for case, group in zip(cases, samples) for k, s in enumerate(group)]
    return rows, (model, tok)


def token_counts(rows, tok):
    return [row.get("completion_tokens") or len(tok(row["completion"], add_special_tokens=False)["input_ids"])
            for row in rows]


def score_rows(scorer, rows, tok):
    results = scorer.score(rows, [r["completion"] for r in rows], token_counts(rows, tok))
    return [{"truncated": False, **row, **r.columns()} for row, r in zip(rows, results)]


def mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(rows):
    m = {f"{p}_mean": mean(r[p] for r in rows) for p in (*protocol.PERSPECTIVES, "bystander")}
    m["reward_mean"] = mean(r["reward"] for r in rows)
    groups = defaultdict(list)
    for r in rows:
        if r["reward"] is not None:
            groups[r["case_id"]].append(r["reward"])
    stds = [float(np.std(g)) for g in groups.values() if len(g) > 1]
    m["reward_std_within_group"] = mean(stds)
    m["frac_zero_std_groups"] = float(np.mean([s < 1e-9 for s in stds])) if stds else None
    m["format_rate"] = mean(float(r["formatted"]) for r in rows)
    m["truncation_rate"] = mean(float(r["truncated"]) for r in rows)
    m["failed_answers"] = sum(r["failed"] for r in rows)
    judged = [r for r in rows if r["reward"] is not None and r["formatted"]]
    names = [p for p in (*protocol.PERSPECTIVES, "bystander") if all(r[p] is not None for r in judged)]
    if len(judged) > 2 and names:
        with np.errstate(invalid="ignore", divide="ignore"):     # a constant perspective has no correlation: None
            matrix = np.corrcoef(np.array([[r[p] for p in names] for r in judged]).T)
        m["perspective_correlation"] = {a: {b: (None if np.isnan(matrix[i, j]) else round(float(matrix[i, j]), 3))
                                            for j, b in enumerate(names)} for i, a in enumerate(names)}
    return m


def main():
    seed_everything(SEED)
    data_dir, _ = upstream(RUNS_DIR, "data", DATA_TAG)
    from datasets import load_from_disk
    from perm.models import load_tokenizer, resolve_model
    valid = list(load_from_disk(str(data_dir / "dataset"))["valid"])
    checked = sanity_cases(valid, SANITY_CASES)
    adapter = None if ANSWERS else sft_adapter()      # scoring a file needs no policy: INIT is not read
    run = StageRun(RUNS_DIR, "reward", TAG, settings, upstream={"data": str(data_dir)})

    policy = None
    if ANSWERS:
        try:
            rows = load_answers(ANSWERS)
        except RowError as e:
            sys.exit(f"error: {e}")
        print(f"[reward] scoring {len(rows)} answers from {ANSWERS} (no policy loaded"
              + (f"; INIT={INIT} is for sampling)" if INIT != "base" else ")"))
    else:
        cases = valid[:MAX_CASES] if MAX_CASES else valid
        print(f"[reward] sampling {SAMPLES_PER_CASE} answers for each of {len(cases)} valid cases from {MODEL}")
        rows, policy = answers_from_policy(cases, adapter)
    # Answer lengths (the length term) count in the policy's tokens, as 04 counts them: without a
    # policy, MODEL's tokenizer alone (a few MB, no weights).
    try:
        tok = policy[1] if policy else load_tokenizer(resolve_model(MODEL, RUNS_DIR))
    except OSError as e:
        sys.exit(f"error: answer lengths are counted with MODEL's tokenizer, and MODEL={MODEL!r} has none here "
                 f"({e}). Name the policy's base as a local folder or alias (MODEL=...), or run online once.")
    # PERM: the judge; "" = the policy's base, the judge 04 trains against by default
    judge_model = JUDGE_MODEL or (MODEL if JUDGE == "local" else "")
    # The sampling policy doubles as the judge only where 04 loads its judge the same way: on the
    # Unsloth path 04's judge comes through Unsloth (its own 4-bit checkpoint), so 03 loads one so too.
    from perm import USE_UNSLOTH
    shared = policy if policy and JUDGE == "local" and judge_model == MODEL and adapter is None \
        and not USE_UNSLOTH else None
    judge = judge_from_settings(settings, model=judge_model, local_model=shared)
    scorer = PermScorer(judge, RewardSettings.from_settings(settings))
    # What the judging will cost, before any of it is sent (an API bill, or hours of a local judge).
    seen = set()
    scoring = scorer.cost(rows, [r["completion"] for r in rows], tok, seen=seen)
    print(f"[reward] judge work ahead (tokens counted with MODEL's tokenizer; retries add to it):\n"
          f"  scoring {len(rows)} answers: {scoring}")
    if checked:
        print(f"  sanity battery on {sum(bool(c.get('reference')) for c in checked)} valid cases (SANITY_CASES=0: "
              f"none): {battery_cost(scorer, checked, tok, pool=valid, seen=seen)}")
    else:
        print("  sanity battery: off (SANITY_CASES=0): these scores come from a judge this run does not check")
    scored = score_rows(scorer, rows, tok)
    metrics = summarize(scored)
    calls = judge.stats.calls
    sanity_rows, sanity_metrics = [], {"sanity_cases": 0}
    if checked:
        sanity_rows, sanity_metrics = run_battery(scorer, checked, lambda rows: token_counts(rows, tok), pool=valid)
        print(f"[reward] sanity battery: {figures_line(sanity_metrics) or 'no valid case has a reference'}")
    scorer.check_failure_rate(final=True)
    metrics.update(sanity_metrics)
    metrics["sanity_judge_calls"] = judge.stats.calls - calls
    metrics.update(judge.stats.as_metrics())
    metrics["answers"] = len(scored)

    from perm.runs import save_splits
    save_splits({"train": scored}, run.path / "scored")
    if sanity_rows:
        save_splits({"train": sanity_rows}, run.path / "sanity")
    final = run.finish(metrics)
    print("\n[reward] summary")
    for key in ("answers", "format_rate", *(f"{p}_mean" for p in (*protocol.PERSPECTIVES, "bystander")), "reward_mean",
                "reward_std_within_group", "frac_zero_std_groups", "sanity_accuracy", "judge_calls",
                "judge_failures", "cache_hits"):
        value = metrics.get(key)
        print(f"  {key:<24} {value:.4f}" if isinstance(value, float) else f"  {key:<24} {value}")
    print(f"[reward] wrote {final}")


if __name__ == "__main__":
    main()

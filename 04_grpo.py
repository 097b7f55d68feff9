"""Stage 04: GRPO against the PERM reward, on one GPU (4-bit QLoRA through Unsloth) or on CPU.

Reads the train split of runs/data/<DATA_TAG>/ and starts from the base model (INIT=base) or from the
SFT adapter of runs/sft/<SFT_TAG>/ (INIT=sft). Every group of NUM_GENERATIONS answers is judged from
the Empathy Cycle's three sides and by a bystander (03's reward, the same settings), and TRL's GRPO
updates a LoRA adapter. The judge is `local` (by default the policy's own base with its adapters
switched off: no second model in memory; or a separate JUDGE_MODEL) or `api` (any OpenAI-compatible
server: OpenAI, vLLM, Ollama).

Writes runs/grpo/<TAG>/: adapter/, log_history.json (every step: each reward term, each perspective,
format rate, loss, KL), metrics.json (reward over the first and last 10% of steps, per perspective,
judge calls/failures/cache hits, format and truncation rates, wall time, peak memory).
Checkpoints every SAVE_STEPS live in runs/grpo/<TAG>.partial/; RESUME=True continues a killed run.
Stops early, with a message and a non-zero exit (checkpoints kept), on NaN loss, on zero reward spread
in every group for ZERO_STD_PATIENCE steps running, or past MAX_JUDGE_FAILURE_RATE.

Run:   python 04_grpo.py                          # PRESET=auto; INIT=sft needs 02_sft.py first
       python 04_grpo.py JUDGE=api JUDGE_BASE_URL=http://localhost:8000/v1 JUDGE_MODEL=Qwen/Qwen2.5-7B-Instruct
       accelerate launch 04_grpo.py ...           # several GPUs: the plain path, one process each

Paper (Qwen2.5-7B full fine-tune, 4 x 80 GB): lr 1e-6, beta 0.01, 8 generations, 64 completions per
step, 1024-token answers, temperature 1.0, loss dapo, group-scaled rewards. One-GPU presets train
LoRA, which needs a higher rate (1e-5), with smaller groups and shorter answers:
  gpu16  Qwen2.5-1.5B-Instruct 4-bit, 6 generations x 2 prompts, 512 tokens, LoRA r16  (~10 GB peak)
  gpu24  Qwen2.5-7B-Instruct 4-bit, 8 generations x 2 prompts, 768 tokens, LoRA r16    (~20 GB peak)
For the paper's settings: LR=1e-6 NUM_GENERATIONS=8 PROMPTS_PER_STEP=8 MAX_COMPLETION_LENGTH=1024
LENGTH_LIMIT=768 (and more memory than one GPU has).
"""
import sys

from perm import USE_UNSLOTH
from perm.judges import PERSPECTIVES as ALL_PERSPECTIVES
from perm.judges import judge_from_settings
from perm.reward import JudgeFailureRateExceeded, PermScorer, RewardSettings, make_reward_functions
from perm.runs import StageRun, inherit, seed_everything, upstream, write_json
from perm.settings import configure, explicit_keys

# ---------------------------------------------------------------- settings
RUNS_DIR = "runs"
TAG = "default"
SEED = 1234
SMOKE = False
PRESET = "auto"
DATA_TAG = "default"
SFT_TAG = "default"
INIT = "sft"                   # sft (from runs/sft/<SFT_TAG>, recommended for small models) | base
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # policy base (INIT=sft inherits it from the SFT run)
MAX_STEPS = 200                # optimizer steps
LR = 1e-5                      # LoRA; paper 1e-6 for a full fine-tune
BETA = 0.01                    # KL coefficient (paper 0.01; TRL's default would be 0)
NUM_GENERATIONS = 6            # answers per prompt (a GRPO group; paper 8)
PROMPTS_PER_STEP = 2           # prompts per device step (lower if OOM)
GRAD_ACCUM = 4                 # device steps per optimizer step
MAX_COMPLETION_LENGTH = 512    # answer budget in tokens (paper 1024)
MAX_PROMPT_TOKENS = 1024       # longer prompts are dropped (and counted)
TEMPERATURE = 1.0              # sampling temperature (paper 1.0)
LORA_R = 16                    # LoRA rank when INIT=base (INIT=sft continues the SFT adapter)
LORA_ALPHA = 32
SAVE_STEPS = 50                # checkpoint every N steps (RESUME=True continues from the last)
RESUME = False
LOG_SAMPLES_EVERY = 10         # print two answers with their scores every N steps (0 = never)
ZERO_STD_PATIENCE = 20         # stop when every group has zero reward spread for N steps running
# judge (CONVENTIONS.md)
JUDGE = "local"                # local | api
JUDGE_SHARES_POLICY = True     # local: judge with the policy's own base (adapters off) instead of JUDGE_MODEL
JUDGE_MODEL = "Qwen/Qwen2.5-3B-Instruct"  # local (when not shared): hub id, folder, alias; api: model name
JUDGE_BASE_URL = ""
JUDGE_MODE = "direct"          # direct | reasoned (paper)
JUDGE_TEMPERATURE = 0.3
JUDGE_CONCURRENCY = 32
JUDGE_BATCH_SIZE = 8
JUDGE_TIMEOUT = 60.0
JUDGE_RETRIES = 3
JUDGE_CACHE = ""
MAX_JUDGE_FAILURE_RATE = 0.2
# reward (METHOD.md section 4)
PERSPECTIVES = ["resonation", "expression", "reception"]
COMBINE = "harmonic"
PERSPECTIVE_WEIGHTS = {"resonation": 1.0, "expression": 1.0, "reception": 1.0}
BYSTANDER_COEF = 0.5
LENGTH_LIMIT = 384             # scale with MAX_COMPLETION_LENGTH (paper: 768 of 1024)
LENGTH_COEF = 0.001
RECEPTION_SEES_HIDDEN_NEED = False

PRESETS = {
    # CPU demo: budgeted from measured timings (135M model, ~1.3 s per 700-token judge forward)
    "cpu": {"MODEL": "smollm2-135m", "MAX_STEPS": 4, "LR": 5e-5, "NUM_GENERATIONS": 2, "PROMPTS_PER_STEP": 2,
            "GRAD_ACCUM": 1, "MAX_COMPLETION_LENGTH": 320, "LENGTH_LIMIT": 280, "SAVE_STEPS": 2,
            "LOG_SAMPLES_EVERY": 2, "JUDGE_MODEL": "smollm2-135m", "JUDGE_BATCH_SIZE": 4},
    "gpu16": {"MODEL": "Qwen/Qwen2.5-1.5B-Instruct", "NUM_GENERATIONS": 6, "PROMPTS_PER_STEP": 2,
              "GRAD_ACCUM": 4, "MAX_COMPLETION_LENGTH": 512, "LENGTH_LIMIT": 384},
    "gpu24": {"MODEL": "Qwen/Qwen2.5-7B-Instruct", "NUM_GENERATIONS": 8, "PROMPTS_PER_STEP": 2,
              "GRAD_ACCUM": 4, "MAX_COMPLETION_LENGTH": 768, "LENGTH_LIMIT": 576},
    "smoke": {"MODEL": "tiny", "MAX_STEPS": 2, "LR": 1e-4, "NUM_GENERATIONS": 2, "PROMPTS_PER_STEP": 2,
              "GRAD_ACCUM": 1, "MAX_COMPLETION_LENGTH": 48, "LENGTH_LIMIT": 40, "SAVE_STEPS": 1,
              "LOG_SAMPLES_EVERY": 1, "JUDGE_MODEL": "tiny", "ZERO_STD_PATIENCE": 50},
}
settings = configure(globals(), PRESETS)


def requests_per_answer(s):
    bystander = 0 if s["BYSTANDER_COEF"] <= 0 else (5 if JUDGE == "local" or s["JUDGE_MODE"] == "direct" else 1)
    return len(s["PERSPECTIVES"]) + bystander


def summary(history, scorer, judge, extra):
    steps = [e for e in history if "reward" in e]
    k = max(1, len(steps) // 10)
    mean = lambda rows, key: (sum(r[key] for r in rows if key in r) / max(1, sum(key in r for r in rows))
                              if any(key in r for r in rows) else None)
    m = {"steps": len(steps), "reward_first_10pct": mean(steps[:k], "reward"), "reward_last_10pct": mean(steps[-k:], "reward")}
    for key in ("rewards/empathy_reward/mean", "rewards/bystander_reward/mean", "rewards/length_reward/mean",
                *(f"perspective/{p}" for p in (*ALL_PERSPECTIVES, "bystander"))):
        m[f"{key}_first_10pct"], m[f"{key}_last_10pct"] = mean(steps[:k], key), mean(steps[-k:], key)
    m["format_rate"] = scorer.answers and 1 - scorer.format_failures / scorer.answers
    m["truncation_rate"] = mean(steps, "completions/clipped_ratio")
    m.update(judge.stats.as_metrics())
    return m | extra


def main():
    from perm.training import (StopGuard, Timer, grpo_config, load_policy, peak_memory_gb,
                               reduce_across_processes)
    seed_everything(SEED)
    data_dir, _ = upstream(RUNS_DIR, "data", DATA_TAG)
    adapter, sources = None, {"data": str(data_dir)}
    if INIT == "sft":
        sft_dir, sft_config = upstream(RUNS_DIR, "sft", SFT_TAG)
        inherit(settings, sft_config["settings"], ["MODEL"], explicit_keys(globals()), f"sft/{SFT_TAG}")
        adapter, sources["sft"] = str(sft_dir / "adapter"), str(sft_dir)
    elif INIT != "base":
        sys.exit(f"error: INIT={INIT!r}; choose base or sft")
    from datasets import load_from_disk
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    run = StageRun(RUNS_DIR, "grpo", TAG, settings, upstream=sources, resume=RESUME)
    timer = Timer()
    model, tok = load_policy(settings["MODEL"], RUNS_DIR, MAX_PROMPT_TOKENS + MAX_COMPLETION_LENGTH, LORA_R,
                             LORA_ALPHA, SEED, adapter)
    train = load_from_disk(str(data_dir / "dataset"))["train"]
    fits = [len(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True)) <= MAX_PROMPT_TOKENS
            for p in train["prompt"]]
    train = train.select([i for i, ok in enumerate(fits) if ok])
    print(f"[grpo] {len(train)} prompts ({fits.count(False)} over MAX_PROMPT_TOKENS dropped); "
          f"path {'unsloth 4-bit' if USE_UNSLOTH else 'transformers + peft'}; init {INIT}")

    shared = JUDGE == "local" and JUDGE_SHARES_POLICY
    judge = judge_from_settings(settings, model=settings["MODEL"] if shared else "",
                                local_model=(model, tok) if shared else None,
                                context=model.disable_adapter if shared else None)
    scorer = PermScorer(judge, RewardSettings.from_settings(settings), auto_check=False)
    answers = MAX_STEPS * GRAD_ACCUM * PROMPTS_PER_STEP * NUM_GENERATIONS
    print(f"[grpo] expected judge calls: up to {answers * requests_per_answer(settings):,} "
          f"({answers:,} answers x {requests_per_answer(settings)} judgments; fewer with format failures "
          f"and cache hits); judge {JUDGE} {'(the policy base)' if shared else JUDGE_MODEL}")

    class Monitor(TrainerCallback):
        """Judge failure stop (reduced across processes) and a few answers with their scores."""
        reason = ""

        def on_step_end(self, args, state, control, **kwargs):
            failed, seen = reduce_across_processes(list(scorer.window_counts()))
            if seen >= 50 and failed > MAX_JUDGE_FAILURE_RATE * seen:   # 50: one bad batch cannot trip it
                Monitor.reason = scorer.failure_message(int(failed), int(seen))
                control.should_training_stop = True
            if LOG_SAMPLES_EVERY and state.global_step % LOG_SAMPLES_EVERY == 0 and scorer.last:
                for text, r in scorer.last[:2]:
                    scores = " ".join(f"{p}={v:.2f}" for p, v in r.scores.items())
                    by = f" bystander={r.bystander:.0f}" if r.bystander is not None else ""
                    print(f"[grpo] step {state.global_step} sample (reward {r.reward}; {scores}{by}):\n"
                          f"{text[:400]}\n")

    guard = StopGuard(ZERO_STD_PATIENCE)
    trainer = GRPOTrainer(model=model, reward_funcs=make_reward_functions(scorer),
                          args=grpo_config(settings, str(run.path / "checkpoints")), train_dataset=train,
                          processing_class=tok, callbacks=[guard, Monitor()])
    checkpoints = sorted((run.path / "checkpoints").glob("checkpoint-*"))
    if RESUME and checkpoints:
        print(f"[grpo] resuming from {checkpoints[-1].name}")
    trainer.train(resume_from_checkpoint=bool(RESUME and checkpoints))
    history = trainer.state.log_history
    write_json(run.path / "log_history.json", history)
    if guard.reason or Monitor.reason:
        sys.exit(f"error: stopped early: {guard.reason or Monitor.reason}\n(checkpoints kept in {run.path})")
    trainer.model.save_pretrained(run.path / "adapter")
    tok.save_pretrained(run.path / "adapter")
    calls, failures, hits = reduce_across_processes([judge.stats.calls, judge.stats.failures, judge.stats.cache_hits])
    metrics = summary(history, scorer, judge, {"wall_time_train_s": timer.seconds(), "peak_memory_gb": peak_memory_gb(),
                                               "judge_calls": int(calls), "judge_failures": int(failures),
                                               "cache_hits": int(hits)})
    if trainer.accelerator.is_main_process:
        final = run.finish(metrics)
        print("\n[grpo] summary")
        for key in ("steps", "reward_first_10pct", "reward_last_10pct", "format_rate", "truncation_rate",
                    "judge_calls", "judge_failures", "cache_hits", "wall_time_train_s", "peak_memory_gb"):
            print(f"  {key:<20} {metrics[key]}")
        print(f"[grpo] wrote {final}")


if __name__ == "__main__":
    try:
        main()
    except JudgeFailureRateExceeded as e:
        sys.exit(e.code)

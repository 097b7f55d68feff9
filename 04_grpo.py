"""Stage 04: GRPO against the PERM reward, on one GPU (4-bit QLoRA through Unsloth) or on CPU.

Reads the train split of runs/data/<DATA_TAG>/ and starts from the base model (INIT=base) or from the
SFT adapter of runs/sft/<SFT_TAG>/ (INIT=sft). Every group of NUM_GENERATIONS answers is judged from
the Empathy Cycle's three sides and by a bystander (03's reward, the same settings), and TRL's GRPO
updates a LoRA adapter. The judge is `local` (JUDGE_MODEL; "" = the policy's own base with its
adapters switched off while judging: no second model in memory) or `api` (any OpenAI-compatible
server: OpenAI, vLLM, Ollama; key in the environment variable JUDGE_API_KEY).

Before step 1 the judge sits the sanity battery of 03_reward.py on the same valid cases (cached: a
judge 03 already checked costs nothing) and training stops if `sanity_accuracy` is below
MIN_SANITY_ACCURACY: GRPO ranks answers that look alike and amplifies whatever the reward says, so a
judge that cannot put a case's own reference above near misses of the same length is caught here.

Writes runs/grpo/<TAG>/: adapter/, completions.jsonl (every scored answer of every step: each
perspective, the bystander's criteria, each reward term; appended as training goes), log_history.json
(every step: each reward term, each perspective, format rate, loss, KL), metrics.json (reward over
the first and last 10% of steps, per perspective, sanity figures, judge calls/failures/cache hits,
format and truncation rates, wall time, peak memory). Checkpoints every SAVE_STEPS live in
runs/grpo/<TAG>.partial/; RESUME=True continues a killed run. Stops early, with a message and a
non-zero exit (checkpoints kept), on NaN loss, on zero reward spread in every group for
ZERO_STD_PATIENCE steps running, or past MAX_JUDGE_FAILURE_RATE.

Run:   python 04_grpo.py                          # PRESET=auto; INIT=sft needs 02_sft.py first
       python 04_grpo.py JUDGE=api JUDGE_MODEL=gpt-4o-mini JUDGE_MODE=reasoned
       accelerate launch --num_processes 2 04_grpo.py   # several GPUs: the plain path, one process each

The paper's run (Qwen2.5-7B full fine-tune on 4 x 80 GB GPUs; README, "Departures from the paper"): lr 1e-6
with 10% warmup then linear decay, beta 0.01, 8 generations per prompt, 64 completions per optimizer
step (8 prompts x 8), 1024-token answers with the length limit at 768, temperature 1.0, loss dapo,
group-scaled rewards, one pass over ~3000 prompts (about 375 optimizer steps of 64 answers). Its batch
shape here: NUM_GENERATIONS=8 PROMPTS_PER_STEP=8 GRAD_ACCUM=1 MAX_COMPLETION_LENGTH=1024
LENGTH_LIMIT=768 (more memory than one consumer GPU has). Its length: MAX_STEPS=375 with either GPU
preset (8 prompts per optimizer step), about 2.9 passes over the library's 1,049 training cases.
One-GPU presets train LoRA, which needs a higher rate (1e-5), with smaller groups and shorter answers:
  gpu16  Qwen2.5-1.5B-Instruct 4-bit, 6 generations x 2 prompts x 4 accumulation, 512 tokens, LoRA r16,
         judged by Qwen2.5-7B-Instruct in 4-bit beside it
  gpu24  Qwen2.5-7B-Instruct 4-bit, 8 generations x 2 prompts x 4 accumulation, 768 tokens, LoRA r16,
         judged by its own base, starting from the base model (INIT=base) as the paper did, so what the
         run changes is GRPO's own doing

This stage is longer than the others on purpose: the GRPO configuration, the judge gate and the stop
rules are the method, so they are shown here rather than hidden in perm/.
"""
import json
import os
import sys

import perm
from perm.judges import REASON_TOKENS, judge_from_settings
from perm.models import chat_length
from perm import protocol
from perm.reward import JudgeFailureRateExceeded, PermScorer, RewardSettings, make_reward_functions
from perm.runs import StageRun, seed_everything, upstream, write_json
from perm.settings import configure, inherit

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
LOAD_IN_4BIT = None            # None = bitsandbytes 4-bit with CUDA, full precision on a CPU; True = 4-bit
                               # on any device (NF4 runs on a CPU too); False = unquantized
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
GRADIENT_CHECKPOINTING = None  # None = on with CUDA (memory), off on CPU (speed); True/False forces it
FAST_INFERENCE = False         # vLLM rollouts in colocate mode (needs vllm; README "Fast rollouts")
SAVE_STEPS = 50                # checkpoint every N steps (RESUME=True continues from the last)
RESUME = False
LOG_SAMPLES_EVERY = 10         # print two answers with their scores every N steps (0 = never)
ZERO_STD_PATIENCE = 20         # stop when every group has zero reward spread for N steps running
# judge (the same settings and presets as 03_reward.py, so 04 trains against the judge 03 checked)
JUDGE = "local"                # local | api
JUDGE_MODEL = "Qwen/Qwen2.5-7B-Instruct"  # local: hub id, folder, alias ("" = the policy's base, shared); api: model
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
SANITY_CASES = None            # valid cases in the pre-training sanity battery: None = all, 0 = no battery
                               # (then the gate needs MIN_SANITY_ACCURACY=0); as in 03
MIN_SANITY_ACCURACY = 0.75     # stop before step 1 when the judge ranks references above near misses less
                               # often (0 = no gate)
# reward (docs/method.md, "Reward")
PERSPECTIVES = ["resonation", "expression", "reception"]
COMBINE = "harmonic"
PERSPECTIVE_WEIGHTS = {"resonation": 1.0, "expression": 1.0, "reception": 1.0}
BYSTANDER_COEF = 0.5
LENGTH_LIMIT = 384             # scale with MAX_COMPLETION_LENGTH (paper: 768 of 1024)
LENGTH_COEF = 0.001
RECEPTION_SEES_HIDDEN_NEED = False

PRESETS = {
    # CPU demo: budgeted from measured timings (135M model, ~1.3 s per 700-token judge forward). Its
    # 135M judge ranks references first on no case, so the gate is off: a plumbing demo, not a result.
    "cpu": {"MODEL": "smollm2-135m", "MAX_STEPS": 4, "LR": 5e-5, "NUM_GENERATIONS": 2, "PROMPTS_PER_STEP": 2,
            "GRAD_ACCUM": 1, "MAX_COMPLETION_LENGTH": 320, "LENGTH_LIMIT": 280, "SAVE_STEPS": 2,
            "LOG_SAMPLES_EVERY": 2, "JUDGE_MODEL": "", "JUDGE_BATCH_SIZE": 4, "SANITY_CASES": 6,
            "MIN_SANITY_ACCURACY": 0.0},
    "gpu24": {"MODEL": "Qwen/Qwen2.5-7B-Instruct", "INIT": "base", "NUM_GENERATIONS": 8, "PROMPTS_PER_STEP": 2,
              "GRAD_ACCUM": 4, "MAX_COMPLETION_LENGTH": 768, "LENGTH_LIMIT": 576, "JUDGE_MODEL": ""},
    "smoke": {"MODEL": "tiny", "MAX_STEPS": 2, "LR": 1e-4, "NUM_GENERATIONS": 2, "PROMPTS_PER_STEP": 2,
              "MAX_PROMPT_TOKENS": 2048,                    # the tiny tokenizer needs about 3x the tokens
              "GRAD_ACCUM": 1, "MAX_COMPLETION_LENGTH": 48, "LENGTH_LIMIT": 40, "SAVE_STEPS": 1,
              "LOG_SAMPLES_EVERY": 1, "JUDGE_MODEL": "", "ZERO_STD_PATIENCE": 50, "SANITY_CASES": 3,
              "MIN_SANITY_ACCURACY": 0.0},
}
settings = configure(globals(), PRESETS)


# ---------------------------------------------------------------- the method: GRPO as configured here

def grpo_config(s: dict, output_dir: str, vllm_memory: float | None = None):
    """TRL's GRPOConfig for PERM. Every value that changes the objective is set here explicitly:
    Unsloth's patched config replaces several of TRL's defaults (it masks truncated answers and
    clips higher under dapo, picks an 8-bit optimizer with weight decay, and turns off the NaN-loss
    filter and vLLM's importance sampling correction), so leaving them unset would train a different
    objective on the GPU path than on the plain one. `vllm_memory`: the card's share TRL's colocated
    vLLM may take with FAST_INFERENCE (04 sizes it from what is free: `perm.memory.vllm_share`).

    The loss runs one group (NUM_GENERATIONS answers) per forward: PROMPTS_PER_STEP groups are
    generated together and then split into as many loss micro-batches, each accumulated, so an
    optimizer step sees the same answers and the same token-normalized loss (dapo divides by the
    tokens of the whole generation batch) while the full-vocabulary logits of the plain path's loss
    cover one group instead of all of them."""
    from trl import GRPOConfig
    from perm.training import gradient_checkpointing, precision
    if s["FAST_INFERENCE"] and vllm_memory is None:
        raise ValueError("FAST_INFERENCE=True: grpo_config needs vLLM's share of the card (perm.memory.vllm_share)")
    fast = ({"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": vllm_memory}
            if s["FAST_INFERENCE"] else {})
    return GRPOConfig(
        output_dir=output_dir, max_steps=s["MAX_STEPS"], learning_rate=s["LR"],
        lr_scheduler_type="linear", warmup_steps=0.1,           # paper: 10% warmup, then linear decay
        beta=s["BETA"],                                         # PERM: KL 0.01 (TRL's default is 0)
        loss_type="dapo", scale_rewards="group",                # PERM: as released
        epsilon=0.2, epsilon_high=0.2,                          # symmetric clip, TRL's default (Unsloth: 0.28)
        mask_truncated_completions=False,                       # truncated answers still learn from the
                                                                # length term and format floor (Unsloth: True)
        optim="adamw_torch", weight_decay=0.0,                  # TRL's defaults (Unsloth: adamw_8bit, 0.001)
        use_bias_correction_kl=False,                           # PERM: the KL term as the paper ran it (TRL
                                                                # 0.25 had no importance weight on it; TRL 1.14: True)
        vllm_importance_sampling_correction=True,               # FAST_INFERENCE: vLLM samples with its own kernels,
                                                                # so the loss reweights by the truncated ratio of the
                                                                # two engines' probabilities (TRL's default; Unsloth: False)
        logging_nan_inf_filter=False,                           # a NaN loss reaches the log, so StopGuard stops
                                                                # on it (TRL's True hides it; Unsloth: False)
        router_aux_loss_coef=0.0,                               # dense models have no router (Unsloth: 0.0)
        reward_weights=None,                                    # all 1: the coefficients live in the reward
        num_generations=s["NUM_GENERATIONS"], temperature=s["TEMPERATURE"],
        max_completion_length=s["MAX_COMPLETION_LENGTH"],
        per_device_train_batch_size=s["NUM_GENERATIONS"],       # one group per loss forward (see above)
        steps_per_generation=s["PROMPTS_PER_STEP"],             # PROMPTS_PER_STEP groups per generation
        gradient_accumulation_steps=s["GRAD_ACCUM"] * s["PROMPTS_PER_STEP"],
        logging_steps=1, save_strategy="steps", save_steps=s["SAVE_STEPS"], save_total_limit=2,
        log_completions=False, report_to="none", seed=s["SEED"], dataloader_num_workers=0,
        gradient_checkpointing=gradient_checkpointing(s["GRADIENT_CHECKPOINTING"]), **fast, **precision())


def judge_requests_per_answer(s: dict, judge) -> int:
    from perm.protocol import requests_per_answer
    return requests_per_answer(s["PERSPECTIVES"], s["BYSTANDER_COEF"] > 0, s["JUDGE_MODE"],
                               judge.backend.bystander_by_criteria)


def cost_estimate(s: dict, judge, scorer, train, tok, answers: int) -> str:
    """Judge requests and tokens for the run, from rendered judge prompts of a few training cases
    (with their reference as the answer, counted with the policy's tokenizer)."""
    from perm.prompts import split_sections
    from perm.protocol import build_requests
    sample = [c for c in train.select(range(min(8, len(train)))) if split_sections(c["reference"] or "")]
    per_answer = judge_requests_per_answer(s, judge)
    if not sample:
        return f"{answers * per_answer:,} judge requests"
    lengths = []
    for case in sample:
        for r in build_requests(case, *split_sections(case["reference"]), s["JUDGE_MODE"], scorer.s.perspectives,
                                bystander=s["BYSTANDER_COEF"] > 0,
                                bystander_by_criteria=judge.backend.bystander_by_criteria):
            lengths.append(chat_length(tok, r.chat()))
    prompt = sum(lengths) / len(sample) * answers
    out_tokens = answers * per_answer * (5 if s["JUDGE_MODE"] == "direct" else 150)
    return (f"up to {answers * per_answer:,} judge requests, ~{prompt:,.0f} prompt tokens and "
            f"~{out_tokens:,} completion tokens (fewer with format failures and cache hits)")


def summary(history, scorer, judge, extra):
    steps = [e for e in history if "reward" in e]
    k = max(1, len(steps) // 10)
    mean = lambda rows, key: (sum(r[key] for r in rows if key in r) / max(1, sum(key in r for r in rows))
                              if any(key in r for r in rows) else None)
    m = {"steps": len(steps), "reward_first_10pct": mean(steps[:k], "reward"), "reward_last_10pct": mean(steps[-k:], "reward")}
    for key in ("rewards/empathy_reward/mean", "rewards/bystander_reward/mean", "rewards/length_reward/mean",
                *(f"perspective/{p}" for p in (*protocol.PERSPECTIVES, "bystander"))):
        m[f"{key}_first_10pct"], m[f"{key}_last_10pct"] = mean(steps[:k], key), mean(steps[-k:], key)
    m["format_rate"] = scorer.answers and 1 - scorer.format_failures / scorer.answers
    m["truncation_rate"] = mean(steps, "completions/clipped_ratio")
    m.update(judge.stats.as_metrics())
    return m | extra


def main():
    from perm.training import (StopGuard, Timer, fast_inference_share, kl_reference, load_policy, peak_memory_gb,
                               reduce_across_processes, world_size)
    seed_everything(SEED)
    data_dir, _ = upstream(RUNS_DIR, "data", DATA_TAG)
    adapter, sources = None, {"data": str(data_dir)}
    if INIT == "sft":
        sft_dir, sft_config = upstream(RUNS_DIR, "sft", SFT_TAG)
        inherit(settings, sft_config["settings"], ["MODEL"], f"sft/{SFT_TAG}")
        adapter, sources["sft"] = str(sft_dir / "adapter"), str(sft_dir)
    elif INIT != "base":
        sys.exit(f"error: INIT={INIT!r}; choose base or sft")
    from datasets import load_from_disk
    from transformers import TrainerCallback
    from trl import GRPOTrainer
    from perm.local_judge import request_budget
    from perm.models import load_tokenizer, resolve_model
    from perm.sanity import figures_line, gate_refusal, run_battery, sanity_cases

    run = StageRun(RUNS_DIR, "grpo", TAG, settings, upstream=sources, resume=RESUME)
    timer = Timer()
    dataset = load_from_disk(str(data_dir / "dataset"))
    if not any(c.get("reference") for c in sanity_cases(list(dataset["valid"]), SANITY_CASES)):
        refusal = gate_refusal({}, MIN_SANITY_ACCURACY)        # before any model loads: nothing to check it on
        if refusal:
            sys.exit(f"error: {refusal}")
    # PERM: the judge. "" = the policy's own base, judged with the adapters off (no second model).
    judge_model = JUDGE_MODEL or (MODEL if JUDGE == "local" else "")
    shared = JUDGE == "local" and resolve_model(judge_model, RUNS_DIR) == resolve_model(MODEL, RUNS_DIR)
    judge = None if shared else judge_from_settings(settings, model=judge_model)   # first: vLLM gets what it leaves
    length = MAX_PROMPT_TOKENS + MAX_COMPLETION_LENGTH
    if shared:   # Unsloth cuts every input to max_seq_length: the policy's must hold the longest judge request
        length = max(length, request_budget(load_tokenizer(resolve_model(MODEL, RUNS_DIR)),
                                            [*dataset["train"], *dataset["valid"]], JUDGE_MODE, PERSPECTIVES,
                                            MAX_COMPLETION_LENGTH, REASON_TOKENS))
    vllm_memory = fast_inference_share(settings, adapter) if FAST_INFERENCE else None
    model, tok = load_policy(MODEL, RUNS_DIR, length, LORA_R, LORA_ALPHA, SEED, adapter,
                             checkpointing=GRADIENT_CHECKPOINTING, fast_inference=FAST_INFERENCE,
                             load_in_4bit=LOAD_IN_4BIT, vllm_memory=vllm_memory)
    kl_reference(model, BETA)              # the KL's reference: the starting policy, on both paths
    train = dataset["train"]
    fits = [chat_length(tok, p, add_generation_prompt=True) <= MAX_PROMPT_TOKENS for p in train["prompt"]]
    train = train.select([i for i, ok in enumerate(fits) if ok])
    print(f"[grpo] {len(train)} prompts ({fits.count(False)} over MAX_PROMPT_TOKENS dropped); "
          f"path {'unsloth 4-bit' if perm.USE_UNSLOTH else 'transformers + peft'}; init {INIT}")

    if shared:
        judge = judge_from_settings(settings, model=judge_model, local_model=(model, tok))
    reward_settings = RewardSettings.from_settings(settings)

    # The judge must be fit before it trains anything: 03's battery, the same cases, cached.
    valid = list(dataset["valid"])
    calls_before = judge.stats.calls
    _, sanity = run_battery(PermScorer(judge, reward_settings), sanity_cases(valid, SANITY_CASES),
                            lambda rows: [len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows],
                            pool=valid)
    print(f"[grpo] judge {JUDGE} {judge_model}{' (the policy base, adapters off)' if shared else ''}: "
          + (figures_line(sanity) or "no sanity battery (no valid case has a reference)"))
    refusal = gate_refusal(sanity, MIN_SANITY_ACCURACY, advice="GRPO asks exactly that of it, and training against "
                           "it would amplify its mistakes. Use a stronger judge (JUDGE_MODEL, or JUDGE=api), check it "
                           "with 03_reward.py, or lower MIN_SANITY_ACCURACY knowingly.")
    if refusal:
        sys.exit(f"error: {refusal}")
    sanity["sanity_judge_calls"] = judge.stats.calls - calls_before      # 0 when 03 checked this judge
    if MIN_SANITY_ACCURACY <= 0:
        print("[grpo] MIN_SANITY_ACCURACY=0: the judge gate is off (the demo presets' tiny judges cannot pass it)")

    scorer = PermScorer(judge, reward_settings, auto_check=False)
    judge.progress = False                     # during training TRL's own bar shows progress
    processes = world_size()
    answers = MAX_STEPS * GRAD_ACCUM * PROMPTS_PER_STEP * NUM_GENERATIONS * processes
    passes = MAX_STEPS * GRAD_ACCUM * PROMPTS_PER_STEP * processes / max(1, len(train))
    print(f"[grpo] {answers:,} answers: {cost_estimate(settings, judge, scorer, train, tok, answers)}")
    print(f"[grpo] {passes:.1f} passes over the {len(train)} training prompts (the paper made one)"
          + (": past a few, GRPO can memorize its prompts; add cases or lower MAX_STEPS" if passes > 3 else ""))

    rank = int(os.environ.get("RANK", "0"))
    completions_file = run.path / ("completions.jsonl" if processes == 1 else f"completions.rank{rank}.jsonl")
    state = {"step": 0}

    def record(texts, results, cases):
        """Every scored answer of a step, appended as it is judged: a killed run keeps them."""
        with open(completions_file, "a", encoding="utf-8") as f:
            for text, r, case in zip(texts, results, cases):
                f.write(json.dumps({"step": state["step"] + 1, "case_id": case.get("id"), "completion": text,
                                    **r.columns()}, ensure_ascii=False) + "\n")

    class Monitor(TrainerCallback):
        """The step counter for completions.jsonl, the judge failure stop (reduced across processes)
        and a few answers with their scores."""
        reason = ""

        def on_step_begin(self, args, state_, control, **kwargs):
            state["step"] = state_.global_step

        def on_step_end(self, args, state_, control, **kwargs):
            failed, seen = reduce_across_processes(list(scorer.window_counts()))
            if seen >= 50 and failed > MAX_JUDGE_FAILURE_RATE * seen:   # 50: one bad batch cannot trip it
                Monitor.reason = scorer.failure_message(int(failed), int(seen))
                control.should_training_stop = True
            if LOG_SAMPLES_EVERY and state_.global_step % LOG_SAMPLES_EVERY == 0 and scorer.last:
                for text, r in scorer.last[:2]:
                    scores = " ".join(f"{p}={v:.2f}" for p, v in r.scores.items())
                    by = f" bystander={r.bystander:.0f}" if r.bystander is not None else ""
                    print(f"[grpo] step {state_.global_step} sample (reward {r.reward}; {scores}{by}):\n"
                          f"{text[:400]}\n")

    guard = StopGuard(ZERO_STD_PATIENCE)
    trainer = GRPOTrainer(model=model, reward_funcs=make_reward_functions(scorer, on_scored=record),
                          args=grpo_config(settings, str(run.path / "checkpoints"), vllm_memory), train_dataset=train,
                          processing_class=tok, callbacks=[guard, Monitor()])
    checkpoints = sorted((run.path / "checkpoints").glob("checkpoint-*"))
    if RESUME and checkpoints:
        print(f"[grpo] resuming from {checkpoints[-1].name}")
    trainer.train(resume_from_checkpoint=bool(RESUME and checkpoints))
    history = trainer.state.log_history
    write_json(run.path / "log_history.json", history)
    if guard.reason or Monitor.reason:
        sys.exit(f"error: stopped early: {guard.reason or Monitor.reason}\n(checkpoints kept in {run.path})")
    trainer.model.save_pretrained(run.path / "adapter", selected_adapters=["default"])   # not the frozen "ref"
    tok.save_pretrained(run.path / "adapter")
    calls, failures, hits = reduce_across_processes([judge.stats.calls, judge.stats.failures, judge.stats.cache_hits])
    metrics = summary(history, scorer, judge, {"wall_time_train_s": timer.seconds(), "peak_memory_gb": peak_memory_gb(),
                                               "judge_calls": int(calls), "judge_failures": int(failures),
                                               "cache_hits": int(hits), "passes": round(passes, 2), **sanity})
    if trainer.accelerator.is_main_process:
        final = run.finish(metrics)
        print("\n[grpo] summary")
        for key in ("steps", "reward_first_10pct", "reward_last_10pct", "sanity_accuracy", "format_rate",
                    "truncation_rate", "judge_calls", "judge_failures", "cache_hits", "wall_time_train_s",
                    "peak_memory_gb"):
            print(f"  {key:<20} {metrics.get(key)}")
        print(f"[grpo] wrote {final}")


if __name__ == "__main__":
    try:
        main()
    except JudgeFailureRateExceeded as e:
        sys.exit(e.code)

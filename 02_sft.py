"""Stage 02: warm-up SFT, so a small policy learns PERM's two-section answer before RL.

Reads the train split of runs/data/<DATA_TAG>/ and trains a LoRA adapter on prompt/completion
pairs in the policy format, from SFT_SOURCE:
  references    the cases' own reference answers (the offline default)
  teacher       answers written by a judge backend (JUDGE=local|api), cached like every judge call;
                answers without both sections are dropped and counted
  <path.jsonl>  an answers file (answers format, README)
Examples longer than MAX_SEQ_LENGTH tokens are dropped and counted. The loss covers the answer
only, end-of-turn token included, so the model learns to stop. SFT here is a format warm-up, not a
style transfer: every FORMAT_CHECK_EVERY steps it samples FORMAT_CHECK_CASES valid cases and stops
once FORMAT_TARGET of them are in the two-section format (EPOCHS or MAX_STEPS is the cap), since
training on past that point copies the references' style into the policy before PERM's reward
acts (`sft_steps_to_format` records when). Afterwards it samples the valid split with the base model
and with the SFT model and records base_format_rate, sft_format_rate and truncation_rate.

Writes runs/sft/<TAG>/: adapter/ (LoRA weights + tokenizer), config.json, metrics.json.

Run:   python 02_sft.py                     # PRESET=auto (CPU: the demo model, a few minutes)
       python 02_sft.py SFT_SOURCE=teacher JUDGE=api JUDGE_MODEL=gpt-4o-mini TAG=teacher

Beyond the paper: PERM starts GRPO from an instruct model (04 with INIT=base, as its gpu24 preset
does); a small model first needs to learn the answer format, which SFT teaches in minutes (on CPU: a
handful of steps).
Presets, with expected peak GPU memory: gpu16 = Qwen2.5-1.5B-Instruct in 4-bit, LoRA r16, 1024
tokens, batch 4 x 4 (about 6 GB; fits a T4); gpu24 = Qwen2.5-7B-Instruct in 4-bit, batch 2 x 8
(about 14 GB). LoRA learns at 1e-4..2e-4, far above a full fine-tune's rate.
"""
import sys

import perm
from perm.cases import RowError, load_answers
from perm.models import chat_length
from perm.prompts import policy_prompt, split_sections
from perm.runs import StageRun, seed_everything, upstream
from perm.settings import configure

# ---------------------------------------------------------------- settings
RUNS_DIR = "runs"
TAG = "default"
SEED = 1234
SMOKE = False
PRESET = "auto"
DATA_TAG = "default"
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # policy base: hub id, folder, or alias (tiny, smollm2-135m)
LOAD_IN_4BIT = None            # None = bitsandbytes 4-bit with CUDA, full precision on a CPU; True = 4-bit
                               # on any device (NF4 runs on a CPU too); False = unquantized
SFT_SOURCE = "references"      # references | teacher | path to an answers JSONL
MAX_SEQ_LENGTH = 1024          # prompt + answer tokens; longer examples are dropped (lower if OOM)
EPOCHS = 2.0
MAX_STEPS = 0                  # > 0 overrides EPOCHS
FORMAT_TARGET = 0.9            # stop once this share of sampled valid answers is in format (0 = train to the cap)
FORMAT_CHECK_EVERY = 25        # optimizer steps between format checks
FORMAT_CHECK_CASES = 10        # valid cases sampled per check (one answer each)
LR = 2e-4                      # LoRA rate; a full fine-tune would use ~1e-5
BATCH_SIZE = 4                 # examples per device step (lower if OOM)
GRAD_ACCUM = 4
LORA_R = 16
LORA_ALPHA = 32
EVAL_CASES = 16                # valid cases sampled for the format rates (0 = all)
MAX_NEW_TOKENS = 512           # answer budget when sampling; past it an answer counts as truncated
# teacher (SFT_SOURCE=teacher): the judge settings (docs/method.md, "Judges")
JUDGE = "local"
JUDGE_MODEL = "Qwen/Qwen2.5-7B-Instruct"
JUDGE_BASE_URL = ""
JUDGE_TEMPERATURE = 0.7        # the teacher writes answers: some variety
JUDGE_TOP_P = 0.9
JUDGE_CONCURRENCY = 32
JUDGE_BATCH_SIZE = 4           # whole answers are long generations: smaller batches than a judge's
JUDGE_TIMEOUT = 120.0          # and more time per request than a judge's 60 s
JUDGE_RETRIES = 3
JUDGE_CACHE = ""

PRESETS = {
    # CPU: budgeted from measured timings (LoRA ~8 ms/token on 2 cores; ~600-token examples)
    "cpu": {"MODEL": "smollm2-135m", "MAX_SEQ_LENGTH": 768, "MAX_STEPS": 60, "BATCH_SIZE": 2, "GRAD_ACCUM": 1,
            "LR": 5e-4, "EVAL_CASES": 8, "MAX_NEW_TOKENS": 512, "JUDGE_MODEL": "smollm2-135m",
            "FORMAT_CHECK_EVERY": 20, "FORMAT_CHECK_CASES": 8, "FORMAT_TARGET": 0.75},
    "gpu24": {"MODEL": "Qwen/Qwen2.5-7B-Instruct", "BATCH_SIZE": 2, "GRAD_ACCUM": 8, "MAX_SEQ_LENGTH": 1536},
    # the tiny model's 1024-token vocabulary needs about three times the tokens of a real one
    "smoke": {"MODEL": "tiny", "MAX_STEPS": 3, "BATCH_SIZE": 2, "GRAD_ACCUM": 1, "EVAL_CASES": 4,
              "MAX_SEQ_LENGTH": 2048, "MAX_NEW_TOKENS": 48, "JUDGE_MODEL": "tiny", "FORMAT_CHECK_EVERY": 2,
              "FORMAT_CHECK_CASES": 2},
}
settings = configure(globals(), PRESETS)


# ---------------------------------------------------------------- the method: SFT as configured here

def sft_config(s: dict, output_dir: str):
    """TRL's SFTConfig for the warm-up: completion-only loss on prompt/completion pairs, so the loss
    sees the answer and its end-of-turn token (the model learns to stop), never the prompt. The
    optimizer is set explicitly: Unsloth's patched config would otherwise pick an 8-bit AdamW with
    weight decay on the GPU path only."""
    from trl import SFTConfig
    from perm.training import gradient_checkpointing, precision
    return SFTConfig(
        output_dir=output_dir, max_length=s["MAX_SEQ_LENGTH"], num_train_epochs=s["EPOCHS"],
        max_steps=s["MAX_STEPS"] or -1, per_device_train_batch_size=s["BATCH_SIZE"],
        gradient_accumulation_steps=s["GRAD_ACCUM"], learning_rate=s["LR"], lr_scheduler_type="cosine",
        warmup_steps=0.1, optim="adamw_torch", weight_decay=0.0,
        completion_only_loss=True,            # the loss sees the answer (and its end-of-turn token) only
        logging_steps=1, save_strategy="no", report_to="none", seed=s["SEED"], dataloader_num_workers=0,
        gradient_checkpointing=gradient_checkpointing(None), **precision())


def examples_from_source(train, tok, data_settings):
    """(prompt, completion) chat pairs from SFT_SOURCE; returns (examples, dropped reasons)."""
    dropped = {}
    if SFT_SOURCE == "references":
        pairs = [(c["prompt"], c["reference"]) for c in train if c["reference"]]
        dropped["no reference"] = len(train) - len(pairs)
    elif SFT_SOURCE == "teacher":
        from perm.judges import judge_from_settings
        from perm.protocol import text_request
        teacher = judge_from_settings(settings, mode="direct", score="expected")   # a writer reads no scores
        requests = [text_request(c["prompt"], MAX_NEW_TOKENS, JUDGE_TEMPERATURE, role="teacher") for c in train]
        answers = teacher.judge(requests)
        pairs = [(c["prompt"], a.text) for c, a in zip(train, answers) if not a.error and split_sections(a.text)]
        dropped["teacher failed"] = sum(bool(a.error) for a in answers)
        dropped["teacher answer not in format"] = len(train) - len(pairs) - dropped["teacher failed"]
        print(f"[sft] teacher: {teacher.stats.calls} calls, {teacher.stats.cache_hits} cache hits, "
              f"{teacher.stats.failures} failures")
    else:
        try:
            rows = load_answers(SFT_SOURCE)
        except RowError as e:
            sys.exit(f"error: {e}")
        prompt_name = data_settings.get("POLICY_PROMPT", "policy")      # the data stage's policy prompt
        pairs = [(policy_prompt(r, prompt_name), r["completion"]) for r in rows if split_sections(r["completion"])]
        dropped["answer not in format"] = len(rows) - len(pairs)
    examples = []
    for prompt, answer in pairs:
        messages = prompt + [{"role": "assistant", "content": answer}]
        if chat_length(tok, messages) > MAX_SEQ_LENGTH:
            dropped["over MAX_SEQ_LENGTH"] = dropped.get("over MAX_SEQ_LENGTH", 0) + 1
            continue
        examples.append({"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]})
    return examples, {k: v for k, v in dropped.items() if v}


def format_rates(model, tok, cases):
    """(format rate, truncation rate) of one sampled answer per case."""
    from perm.generation import sample_answers
    samples = sample_answers(model, tok, [c["prompt"] for c in cases], 1, MAX_NEW_TOKENS, 0.7, seed=SEED)
    answers = [group[0] for group in samples]
    return (sum(split_sections(a["text"]) is not None for a in answers) / len(answers),
            sum(a["truncated"] for a in answers) / len(answers), answers)


def main():
    seed_everything(SEED)
    data_dir, data_config = upstream(RUNS_DIR, "data", DATA_TAG)
    from datasets import Dataset, load_from_disk
    from trl import SFTTrainer
    from perm.training import FormatStop, Timer, load_policy, peak_memory_gb

    splits = load_from_disk(str(data_dir / "dataset"))
    run = StageRun(RUNS_DIR, "sft", TAG, settings, upstream={"data": str(data_dir)})
    timer = Timer()
    model, tok = load_policy(MODEL, RUNS_DIR, MAX_SEQ_LENGTH, LORA_R, LORA_ALPHA, SEED, load_in_4bit=LOAD_IN_4BIT)
    examples, dropped = examples_from_source(list(splits["train"]), tok, data_config["settings"])
    if not examples:
        sys.exit(f"error: no SFT examples left from SFT_SOURCE={SFT_SOURCE!r} (dropped: {dropped})")
    print(f"[sft] {len(examples)} examples; dropped {dropped or 'none'}; "
          f"path {'unsloth 4-bit' if perm.USE_UNSLOTH else 'transformers + peft'}")
    # the format warm-up's stop: a few valid cases sampled every FORMAT_CHECK_EVERY steps
    check_cases = list(splits["valid"])[:FORMAT_CHECK_CASES]
    format_stop = FormatStop(lambda: format_rates(model, tok, check_cases)[0], FORMAT_TARGET if check_cases else 0.0,
                             FORMAT_CHECK_EVERY)
    trainer = SFTTrainer(model=model, args=sft_config(settings, str(run.path / "checkpoints")),
                         train_dataset=Dataset.from_list(examples), processing_class=tok, callbacks=[format_stop])
    result = trainer.train()
    trainer.model.save_pretrained(run.path / "adapter")
    tok.save_pretrained(run.path / "adapter")

    valid = list(splits["valid"])[:EVAL_CASES or None]
    model = trainer.model.eval()
    with model.disable_adapter():
        base_rate, _, _ = format_rates(model, tok, valid)
    sft_rate, truncation, answers = format_rates(model, tok, valid)
    print(f"[sft] an SFT answer:\n{answers[0]['text'][:600]}\n")
    metrics = {"base_format_rate": base_rate, "sft_format_rate": sft_rate, "truncation_rate": truncation,
               "train_loss": result.training_loss, "steps": result.global_step, "examples": len(examples),
               "sft_steps_to_format": format_stop.reached_at, "format_checks": format_stop.checks,
               "dropped": dropped, "eval_cases": len(valid), "peak_memory_gb": peak_memory_gb(),
               "train_seconds": timer.seconds()}
    final = run.finish(metrics)
    print("\n[sft] summary")
    for key in ("examples", "steps", "sft_steps_to_format", "train_loss", "base_format_rate", "sft_format_rate",
                "truncation_rate", "peak_memory_gb", "train_seconds"):
        print(f"  {key:<18} {metrics[key]}")
    if format_stop.reached_at and sft_rate < FORMAT_TARGET:
        print(f"[sft] note: the check met FORMAT_TARGET {FORMAT_TARGET} on {len(check_cases)} valid cases at step "
              f"{format_stop.reached_at}, but {len(valid)} cases give {sft_rate:.2f}: the check was lucky. Raise "
              "FORMAT_CHECK_CASES for a steadier stop, or FORMAT_TARGET=0 to train to the cap.")
    print(f"[sft] wrote {final}")


if __name__ == "__main__":
    main()

"""Training plumbing shared by 02 and 04: the policy for training (Unsloth 4-bit or plain PEFT),
TRL configs built from a stage's settings, and run-control callbacks.

The configs are built here, not in the stages, so tests can check every preset's config against
the pinned TRL without a GPU.
"""
from __future__ import annotations

import math
import os
import time

import torch
from transformers import TrainerCallback

from perm import USE_UNSLOTH
from perm.models import load_tokenizer, resolve_model

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def precision() -> dict:
    """bf16 where the GPU has it, fp16 on older GPUs (T4), fp32 on CPU."""
    if not torch.cuda.is_available():
        return {"use_cpu": True, "bf16": False, "fp16": False}
    if torch.cuda.is_bf16_supported():
        return {"bf16": True, "fp16": False}
    return {"bf16": False, "fp16": True}


def load_policy(name: str, runs_dir, max_seq_length: int, lora_r: int, lora_alpha: int, seed: int,
                adapter: str | None = None):
    """(PEFT model, tokenizer) ready for a TRL trainer (pass no peft_config): a 4-bit base with LoRA
    through Unsloth, or the full-precision base (fp32 on CPU) with LoRA through PEFT; with `adapter`,
    that SFT adapter loaded trainable. With adapters disabled the model is its own base, which 04
    can use as the local judge without a second copy in memory."""
    path = resolve_model(name, runs_dir)
    if USE_UNSLOTH:
        from unsloth import FastLanguageModel
        model, tok = FastLanguageModel.from_pretrained(adapter or path, max_seq_length=max_seq_length,
                                                       load_in_4bit=True, dtype=None)
        if adapter is None:
            model = FastLanguageModel.get_peft_model(model, r=lora_r, lora_alpha=lora_alpha,
                                                     target_modules=LORA_TARGETS, lora_dropout=0.0,
                                                     use_gradient_checkpointing="unsloth", random_state=seed)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return model, tok
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM
    dtype = torch.float32 if not torch.cuda.is_available() else (
        torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    from peft import get_peft_model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tok = load_tokenizer(adapter or path)
    if adapter:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True), tok
    targets = [t for t in LORA_TARGETS if any(n.endswith(t) for n, _ in model.named_modules())]
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config), tok


def sft_config(s: dict, output_dir: str):
    from trl import SFTConfig
    return SFTConfig(
        output_dir=output_dir, max_length=s["MAX_SEQ_LENGTH"], num_train_epochs=s["EPOCHS"],
        max_steps=s["MAX_STEPS"] or -1, per_device_train_batch_size=s["BATCH_SIZE"],
        gradient_accumulation_steps=s["GRAD_ACCUM"], learning_rate=s["LR"], lr_scheduler_type="cosine",
        warmup_steps=0.1, logging_steps=1, save_strategy="no", report_to="none", seed=s["SEED"],
        completion_only_loss=True,            # the loss sees the answer (and its end-of-turn token) only
        gradient_checkpointing=torch.cuda.is_available(), dataloader_num_workers=0, **precision())


def grpo_config(s: dict, output_dir: str):
    from trl import GRPOConfig
    per_step = s["PROMPTS_PER_STEP"] * s["NUM_GENERATIONS"]
    return GRPOConfig(
        output_dir=output_dir, max_steps=s["MAX_STEPS"], learning_rate=s["LR"], lr_scheduler_type="constant_with_warmup",
        warmup_steps=0.1, beta=s["BETA"],                       # PERM: KL 0.01, set explicitly (TRL's default is 0)
        num_generations=s["NUM_GENERATIONS"], per_device_train_batch_size=per_step,
        gradient_accumulation_steps=s["GRAD_ACCUM"], generation_batch_size=per_step,
        max_completion_length=s["MAX_COMPLETION_LENGTH"], temperature=s["TEMPERATURE"],
        loss_type="dapo", scale_rewards="group",                # PERM: as released
        reward_weights=None,                                    # all 1: the coefficients live in the reward
        logging_steps=1, save_strategy="steps", save_steps=s["SAVE_STEPS"], save_total_limit=2,
        log_completions=False, report_to="none", seed=s["SEED"], gradient_checkpointing=torch.cuda.is_available(),
        dataloader_num_workers=0, **precision())


def reduce_across_processes(values: list[float]) -> list[float]:
    """Sum values over all processes (a no-op in a single process), so every process takes the same
    stop decision and none is left waiting in a collective."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


class StopGuard(TrainerCallback):
    """Stops a GRPO run early, with a clear message, on NaN loss or when every group had zero reward
    spread for `patience` steps in a row (nothing left to learn from)."""

    def __init__(self, patience: int):
        self.patience, self.flat_steps, self.reason = patience, 0, ""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        bad_loss = float(math.isnan(logs["loss"]) or math.isinf(logs["loss"])) if "loss" in logs else 0.0
        flat = float(logs.get("frac_reward_zero_std", 0.0) >= 1.0) if "frac_reward_zero_std" in logs else 0.0
        bad_loss, flat = reduce_across_processes([bad_loss, flat])
        if bad_loss:
            self.reason = f"NaN/inf loss at step {state.global_step}: lower LR, or check the reward terms"
        if "frac_reward_zero_std" in logs:
            self.flat_steps = self.flat_steps + 1 if flat else 0
            if self.flat_steps >= self.patience:
                self.reason = (f"every group had zero reward spread for {self.patience} steps in a row: the judge "
                               f"cannot tell the answers apart (raise TEMPERATURE or NUM_GENERATIONS, or check the judge)")
        if self.reason:
            print(f"[grpo] stopping early: {self.reason}")
            control.should_training_stop = True


class Timer:
    def __init__(self):
        self.started = time.time()

    def seconds(self) -> float:
        return round(time.time() - self.started, 1)


def peak_memory_gb() -> float | None:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    try:
        import resource
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)  # CPU: peak RSS
    except ImportError:
        return None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))

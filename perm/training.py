"""Training plumbing shared by 02 and 04: the policy for training (Unsloth 4-bit or plain PEFT),
TRL configs built from a stage's settings, and run-control callbacks.

The configs are built here, not in the stages, so tests can check every preset's config against
the pinned TRL without a GPU.
"""
from __future__ import annotations

import math
import os
import time
from importlib.util import find_spec

import torch
from transformers import TrainerCallback

from perm import USE_UNSLOTH
from perm.models import gpu_dtype, inference_kwargs, load_tokenizer, resolve_model

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def precision() -> dict:
    """Mixed precision for a TRL config: bf16 on a GPU of compute capability 8.0 or later, fp16 on
    older ones (a T4 is 7.5: torch counts emulated bf16 as supported there), fp32 on the CPU."""
    if not torch.cuda.is_available():
        return {"use_cpu": True, "bf16": False, "fp16": False}
    bf16 = gpu_dtype() == torch.bfloat16
    return {"bf16": bf16, "fp16": not bf16}


def gradient_checkpointing(setting) -> bool:
    """GRADIENT_CHECKPOINTING: None = on with CUDA (memory), off on the CPU (speed); or forced."""
    return torch.cuda.is_available() if setting is None else bool(setting)


def load_policy(name: str, runs_dir, max_seq_length: int, lora_r: int, lora_alpha: int, seed: int,
                adapter: str | None = None, checkpointing: bool | None = None, fast_inference: bool = False):
    """(PEFT model, tokenizer) ready for a TRL trainer (pass no peft_config), in training state: a
    4-bit base with LoRA through Unsloth; on the plain path a 4-bit base on a GPU (QLoRA, the same
    weights a local judge of this base is checked with in 03) or fp32 on the CPU, with LoRA through
    PEFT. With `adapter`, that SFT adapter loaded trainable. With adapters disabled the model is its
    own base, which 04 uses as the local judge without a second copy in memory.

    `fast_inference` (04's FAST_INFERENCE) follows Unsloth's GRPO recipe: a vLLM engine beside the
    model for rollouts (half the GPU's memory, LoRA up to this rank); TRL's colocate vLLM on the
    plain path. Either needs `pip install vllm`."""
    checkpointing = gradient_checkpointing(checkpointing)
    if fast_inference and find_spec("vllm") is None:
        raise SystemExit("error: FAST_INFERENCE=True needs vLLM: pip install vllm (README, 'Fast rollouts')")
    path = resolve_model(name, runs_dir)
    if USE_UNSLOTH:
        from unsloth import FastLanguageModel
        fast = {"fast_inference": True, "max_lora_rank": lora_r, "gpu_memory_utilization": 0.5} if fast_inference else {}
        model, tok = FastLanguageModel.from_pretrained(adapter or path, max_seq_length=max_seq_length,
                                                       load_in_4bit=True, dtype=None, **fast)
        if adapter is None:
            model = FastLanguageModel.get_peft_model(model, r=lora_r, lora_alpha=lora_alpha,
                                                     target_modules=LORA_TARGETS, lora_dropout=0.0,
                                                     use_gradient_checkpointing="unsloth" if checkpointing else False,
                                                     random_state=seed)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return model, tok
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, **inference_kwargs(quantize=True))
    if torch.cuda.is_available():
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable()
    tok = load_tokenizer(adapter or path)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    else:
        targets = [t for t in LORA_TARGETS if any(n.endswith(t) for n, _ in model.named_modules())]
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=targets,
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    if checkpointing:
        model.enable_input_require_grads()       # checkpointed LoRA layers need a grad-carrying input
    model.train()
    return model, tok


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

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
from perm.models import gpu_dtype, load_base, load_tokenizer, resolve_model, use_4bit

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


def adapter_rank(adapter: str) -> int:
    """The LoRA rank of a saved adapter folder."""
    import json
    from pathlib import Path
    return int(json.loads((Path(adapter) / "adapter_config.json").read_text())["r"])


def load_policy(name: str, runs_dir, max_seq_length: int, lora_r: int, lora_alpha: int, seed: int,
                adapter: str | None = None, checkpointing: bool | None = None, fast_inference: bool = False,
                *, load_in_4bit: bool | None, vllm_memory: float | None = None):
    """(PEFT model, tokenizer) ready for a TRL trainer (pass no peft_config), in training state: a
    base in 4-bit per LOAD_IN_4BIT (`perm.models.use_4bit`) with LoRA, through Unsloth on the Unsloth
    path, through transformers + PEFT otherwise. With `adapter`, that SFT adapter loaded trainable.
    With adapters disabled the model is its own base, which 04 uses as the local judge without a
    second copy in memory.

    On the plain path the base is frozen and every weight bitsandbytes does not quantize (embeddings,
    LM head, norms) stays in the compute dtype, as on the Unsloth path: PEFT's
    prepare_model_for_kbit_training would upcast them to fp32 (a 7B's embeddings and head from 2.2 to
    4.4 GB, and full-vocabulary logits in fp32), which is also the precision a judge's cache key names.

    `fast_inference` (04's FAST_INFERENCE) follows Unsloth's GRPO recipe: a vLLM engine beside the
    model for rollouts, taking `vllm_memory` of the card (04 sizes it from what is free once the judge
    has loaded: `perm.memory.vllm_share`), LoRA up to the rank of the adapter being trained. TRL's
    colocate vLLM on the plain path. Either needs vLLM (README, 'Fast rollouts')."""
    checkpointing = gradient_checkpointing(checkpointing)
    if fast_inference and find_spec("vllm") is None:
        raise SystemExit("error: FAST_INFERENCE=True needs vLLM: pip install -c requirements.txt vllm==0.32.0 "
                         "(README, 'Fast rollouts')")
    path = resolve_model(name, runs_dir)
    if USE_UNSLOTH:
        from unsloth import FastLanguageModel
        rank = adapter_rank(adapter) if adapter else lora_r     # the adapter being trained
        fast = ({"fast_inference": True, "max_lora_rank": rank, "gpu_memory_utilization": vllm_memory}
                if fast_inference else {})
        model, tok = FastLanguageModel.from_pretrained(adapter or path, max_seq_length=max_seq_length,
                                                       load_in_4bit=use_4bit(load_in_4bit), dtype=None, **fast)
        if adapter is None:
            model = FastLanguageModel.get_peft_model(model, r=lora_r, lora_alpha=lora_alpha,
                                                     target_modules=LORA_TARGETS, lora_dropout=0.0,
                                                     use_gradient_checkpointing="unsloth" if checkpointing else False,
                                                     random_state=seed)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return model, tok
    from peft import LoraConfig, PeftModel, get_peft_model
    model = load_base(path, load_in_4bit)
    model.requires_grad_(False)                  # the base is frozen; LoRA trains (in fp32, PEFT's default)
    if checkpointing:
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


def kl_reference(model, beta: float) -> None:
    """One KL reference on both paths: the starting policy. TRL (the plain path) copies the adapter it
    is given into a frozen adapter named "ref" and computes the KL against it (with INIT=sft, the SFT
    policy; with INIT=base, a fresh LoRA, i.e. the base). Unsloth's trainer deletes that block for
    TRL >= 1.4, so TRL's reference scoring (`use_adapter(model, "ref" if "ref" in model.peft_config
    else None)`, kept by Unsloth) would fall back to `disable_adapter()`: the base before SFT, and
    BETA would pull the two paths toward different models. The same frozen copy is made here on the
    Unsloth path. (Merging the SFT adapter into the base instead would requantize the 4-bit weights,
    changing the starting policy, and leave an adapter that only fits the merged base.)"""
    if not (USE_UNSLOTH and beta and hasattr(model, "peft_config")) or "ref" in model.peft_config:
        return
    model.add_adapter("ref", model.peft_config["default"])
    for name, param in model.named_parameters():
        if ".default." in name:
            ref = model.get_parameter(name.replace(".default.", ".ref."))
            ref.data.copy_(param.data)
            ref.requires_grad_(False)


def fast_inference_share(s, adapter: str | None) -> float:
    """vLLM's share of the card under FAST_INFERENCE (04's settings `s`), from what is free now (a
    separate judge is already loaded) less what training needs (`perm.memory`); refuses, with the
    arithmetic, where vLLM would not fit. On the Unsloth path the engine starts with the policy and
    holds its 4-bit weights; on the plain path TRL starts it after the policy has loaded, and it
    loads the base again in the compute dtype."""
    from transformers import AutoConfig
    from perm.memory import GB, Shape, grpo_estimate, training_need_gb, vllm_share, weights_gb
    from perm.models import use_4bit
    path = resolve_model(s["MODEL"], s["RUNS_DIR"])
    shape = Shape.of(AutoConfig.from_pretrained(path).get_text_config())
    four_bit = use_4bit(s["LOAD_IN_4BIT"])
    estimate = grpo_estimate(shape, None, four_bit=four_bit, lora_r=adapter_rank(adapter) if adapter else s["LORA_R"],
                             generations=s["NUM_GENERATIONS"], prompts=s["PROMPTS_PER_STEP"],
                             prompt_tokens=s["MAX_PROMPT_TOKENS"], completion_tokens=s["MAX_COMPLETION_LENGTH"],
                             judge_batch=0, judge_tokens=0, checkpointing=gradient_checkpointing(s["GRADIENT_CHECKPOINTING"]),
                             unsloth=USE_UNSLOTH)
    free, total = (x / GB for x in torch.cuda.mem_get_info())
    if not USE_UNSLOTH:
        free -= estimate["policy_weights"]            # the policy loads before TRL starts the engine
    engine = weights_gb(shape, four_bit and USE_UNSLOTH) + estimate["generation_kv_cache"]
    share = vllm_share(free, total, training_need_gb(estimate), engine)
    print(f"[grpo] vLLM gets {share:.0%} of the {total:.1f} GB card: {free:.1f} GB free for it and training, "
          f"training needs {training_need_gb(estimate):.1f} GB, the engine at least {engine:.1f} GB")
    return share


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


class FormatStop(TrainerCallback):
    """Stops SFT once the policy writes the two-section format often enough: 02 is a format warm-up,
    and training on past that point copies the references' style into the policy before PERM's
    reward acts. Every `every` optimizer steps `check()` gives the format rate of a few sampled valid
    answers; at `target` or above, training stops. Sampling runs on a forked random state, so the
    checks leave the training's randomness as it was."""

    def __init__(self, check, target: float, every: int):
        self.check, self.target, self.every = check, target, every
        self.reached_at: int | None = None      # the step whose check met the target (sft_steps_to_format)
        self.checks: list[list] = []            # [step, format rate] of every check

    def on_step_end(self, args, state, control, **kwargs):
        last = state.global_step >= state.max_steps      # 02 measures the format after training anyway
        if self.target <= 0 or self.every <= 0 or state.global_step % self.every or last:
            return
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            rate = self.check()
        self.checks.append([state.global_step, rate])
        print(f"[sft] step {state.global_step}: format rate {rate:.2f} (FORMAT_TARGET {self.target})")
        if rate >= self.target:
            self.reached_at = state.global_step
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

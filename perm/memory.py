"""GPU memory arithmetic for a policy, its judge and a GRPO step, from the models' shapes.

The same figures serve `tools/gpu_check.py` (printed before each check, the measured peak beside them
after) and 04's FAST_INFERENCE sizing (what vLLM may take once the judge is loaded and training's own
need is set aside). They are estimates of the largest terms, not a profiler: a CUDA context, the
allocator's slack and kernels' workspaces come on top (CONTEXT_GB).
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1024**3
NF4_BYTES = 0.5 + 1 / 64 * (1 + 4 / 256)   # 4-bit weights + double-quantized absmax per 64-weight block
LORA_STATE_BYTES = 16                      # fp32 LoRA weight, its gradient, AdamW's two moments
CONTEXT_GB = 0.6                           # CUDA context and allocator slack, about


@dataclass
class Shape:
    """A decoder's sizes (the fields of a Qwen2/Qwen3 config)."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int = 0                       # 0: hidden_size / num_attention_heads (Qwen2)

    @classmethod
    def of(cls, config) -> "Shape":
        """From a transformers config or a dict of its fields."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else \
            (lambda k, d=None: getattr(config, k, d))
        return cls(**{k: get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "vocab_size",
                                           "tie_word_embeddings")}, head_dim=get("head_dim", 0) or 0)

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def linear_params(self) -> int:
        """Weights of the attention and MLP projections (what bitsandbytes quantizes)."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.hd, self.num_key_value_heads * self.hd
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size
        return per_layer * self.num_hidden_layers

    def embedding_params(self) -> int:
        """Input embeddings plus the LM head when untied (kept in the compute dtype, never quantized)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def lora_params(self, r: int) -> int:
        """LoRA A and B on the seven projections of every layer."""
        h, q, kv, i = (self.hidden_size, self.num_attention_heads * self.hd, self.num_key_value_heads * self.hd,
                       self.intermediate_size)
        pairs = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
        return r * sum(a + b for a, b in pairs) * self.num_hidden_layers


def weights_gb(shape: Shape, four_bit: bool, dtype_bytes: int = 2) -> float:
    """A model's resident weights: 4-bit projections (or the compute dtype) plus embeddings and head in
    the compute dtype. prepare_model_for_kbit_training's fp32 upcast would double the second term."""
    linear = shape.linear_params() * (NF4_BYTES if four_bit else dtype_bytes)
    return (linear + shape.embedding_params() * dtype_bytes) / GB


def logits_gb(shape: Shape, rows: int, tokens: int, dtype_bytes: int = 2) -> float:
    """Full-vocabulary logits for rows x tokens positions, and their gradient: the loss's peak term on
    the plain path (TRL's loss reads log-probabilities from full logits); Unsloth's loss is chunked."""
    return 2 * rows * tokens * shape.vocab_size * dtype_bytes / GB


def activations_gb(shape: Shape, rows: int, tokens: int, checkpointing: bool, dtype_bytes: int = 2) -> float:
    """What the backward keeps: with gradient checkpointing each layer's input plus one layer
    recomputed; without it, every layer's intermediate tensors (about 8 hidden-wide and 3 MLP-wide)."""
    per_token_layer = (8 * shape.hidden_size + 3 * shape.intermediate_size) * dtype_bytes
    if checkpointing:
        kept = shape.num_hidden_layers * shape.hidden_size * dtype_bytes + per_token_layer
    else:
        kept = shape.num_hidden_layers * per_token_layer
    return rows * tokens * kept / GB


def kv_cache_gb(shape: Shape, rows: int, tokens: int, dtype_bytes: int = 2) -> float:
    """Keys and values of every layer for rows x tokens positions (generation)."""
    return 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.hd * rows * tokens * dtype_bytes / GB


def grpo_estimate(policy: Shape, judge: Shape | None, *, four_bit: bool, lora_r: int, generations: int,
                  prompts: int, prompt_tokens: int, completion_tokens: int, judge_batch: int, judge_tokens: int,
                  checkpointing: bool, unsloth: bool, dtype_bytes: int = 2) -> dict:
    """GB per term of one GRPO step on one GPU, and their sum (`total`). The loss runs one group
    (`generations` rows) per forward (04's grpo_config); generation holds a KV cache for the whole
    generation batch; a separate `judge` sits beside the policy in 4-bit and forwards `judge_batch`
    requests of `judge_tokens` without a KV cache, reading logits at the last position only."""
    tokens = prompt_tokens + completion_tokens
    out = {"policy_weights": weights_gb(policy, four_bit, dtype_bytes),
           "lora_and_optimizer": policy.lora_params(lora_r) * LORA_STATE_BYTES / GB,
           "loss_logits": 0.0 if unsloth else logits_gb(policy, generations, completion_tokens + 1, dtype_bytes),
           "activations": activations_gb(policy, generations, tokens, checkpointing, dtype_bytes),
           "generation_kv_cache": kv_cache_gb(policy, generations * prompts, tokens, dtype_bytes),
           "judge_weights": weights_gb(judge, True, dtype_bytes) if judge else 0.0,
           "judge_forward": activations_gb(judge or policy, judge_batch, judge_tokens, False, dtype_bytes)
                            / (judge or policy).num_hidden_layers,
           "context": CONTEXT_GB}
    out = {k: round(v, 2) for k, v in out.items()}
    out["total"] = round(sum(out.values()), 2)
    return out


def training_need_gb(estimate: dict) -> float:
    """What training needs beside vLLM's engine (which holds the policy's weights for rollouts and its
    own KV cache on the Unsloth path): LoRA state, the loss's logits and the activations."""
    return round(estimate["lora_and_optimizer"] + estimate["loss_logits"] + estimate["activations"], 2)


def vllm_share(free_gb: float, total_gb: float, training_gb: float, engine_min_gb: float) -> float:
    """vLLM's gpu_memory_utilization: the share of the card it may take, from what is free now (after
    a separate judge has loaded) less what training still needs. Below `engine_min_gb` (the weights
    it loads plus a KV cache for one generation batch) it refuses, with the arithmetic."""
    available = free_gb - training_gb - CONTEXT_GB
    if available < engine_min_gb:
        raise SystemExit(
            f"error: FAST_INFERENCE=True does not fit: {free_gb:.1f} GB free of {total_gb:.1f} GB after the judge "
            f"loaded, minus {training_gb:.1f} GB that training needs and {CONTEXT_GB:.1f} GB of context, leaves "
            f"{available:.1f} GB for vLLM, which needs {engine_min_gb:.1f} GB (its weights and a KV cache for one "
            f"generation batch). Use FAST_INFERENCE=False, a smaller judge (JUDGE_MODEL, or JUDGE=api), or fewer "
            f"NUM_GENERATIONS / PROMPTS_PER_STEP.")
    return round(available / total_gb, 3)

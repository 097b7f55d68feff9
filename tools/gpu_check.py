"""Does a preset fit this GPU, and how fast is it? A few SFT and GRPO steps per preset, offline.

    python tools/gpu_check.py                    # CUDA: gpu16, gpu24 and a newer candidate, Unsloth and plain paths
    make gpu-check                               # the same, after `make setup-gpu`
    python tools/gpu_check.py SCALE=tiny         # CPU: the same code at toy scale (the test suite runs it)

No model hub is needed: models are random-weight shapes of the presets' models (the real vocabulary
size, hidden sizes and layer counts), which is all that step time and memory depend on. They are
written once, before any check, by a separate process, on the CPU in the card's dtype and tensor by
tensor into sharded files (a 7B shape never sits whole in RAM or on the GPU in fp32: a 12 GB Colab
host builds it). For each preset and path a fresh process runs SFT_STEPS of 02's SFT (the policy
loaded with 02's MAX_SEQ_LENGTH), then GRPO_STEPS of 04's GRPO from that SFT adapter, as 04 with
INIT=sft does: the policy loaded with 04's length, the judge each preset really uses (a separate
4-bit judge beside the policy on gpu16, the policy's own base on gpu24), the KL reference 04 sets.
Answers of a random model are never in the two-section format, so here every answer is judged whole
(04 would give them the format floor without judge calls): the judge works every step.

Before the checks it prints each preset's memory estimate (`perm.memory`); after, beside it, the
measured peak: memory reserved by PyTorch plus the CUDA context (peak RSS of the check's process on a
CPU). Also printed: SFT and GRPO step times without the first step (compilation, allocator warm-up),
the first GRPO step on its own, generation tokens/s counted over generation alone, judge judgments/s,
the first step's KL (about 0: the reference is the starting policy, on both paths), and whether
distinct answers got distinct bystander scores with the policy in its training state.

The candidate: Qwen3-4B-Instruct-2507 as a 16 GB policy judged by Qwen3-8B (thinking off: the judge
renders its prompts with enable_thinking=False), with gpu16's settings, so the first GPU run can
choose the defaults on evidence. Unsloth 2026.10.9 maps both to 4-bit checkpoints.

Each path runs in its own process (Unsloth must be imported before transformers, or not at all);
results go to RUNS_DIR/gpu_check/<TAG>.json.
"""
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from perm.settings import configure  # noqa: E402

RUNS_DIR = "runs"
TAG = "default"
SEED = 1234
SCALE = "auto"                 # auto (real on CUDA, tiny on CPU) | real | tiny
PRESETS_TO_CHECK = ["gpu16", "gpu24", "candidate"]
PATHS = ["unsloth", "plain"]   # unsloth runs only where it is installed (make setup-gpu)
SFT_STEPS = 3                  # the first is reported apart, the rest averaged
GRPO_STEPS = 3
SHARD_GB = 2.0                 # random models are written in shards of at most this size
ONE = ""                       # internal: "preset/path" runs one check in this process
BUILD = ""                     # internal: "shape/dtype" writes one random model in this process

# Real shapes of the checked models (their configs' sizes); "tiny*" stand in for them on a CPU.
SHAPES = {
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=True),       # Qwen3-4B-Instruct-2507
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=False),
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=0, tie_word_embeddings=True),     # 0: the tokenizer's own
    "tiny-qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=0, tie_word_embeddings=True),
}
CHECKS = {   # check -> (policy shape, judge shape ("" = the policy's base), the stages' preset it runs)
    "gpu16": ("qwen2.5-1.5b", "qwen2.5-7b", "gpu16"),
    "gpu24": ("qwen2.5-7b", "", "gpu24"),
    "candidate": ("qwen3-4b", "qwen3-8b", "gpu16"),
}
TINY = {"qwen2.5-1.5b": "tiny", "qwen2.5-7b": "tiny", "qwen3-4b": "tiny-qwen3", "qwen3-8b": "tiny-qwen3"}
TINY_GRPO = {"NUM_GENERATIONS": 2, "PROMPTS_PER_STEP": 2, "GRAD_ACCUM": 1, "MAX_COMPLETION_LENGTH": 16,
             "MAX_PROMPT_TOKENS": 2048, "JUDGE_BATCH_SIZE": 4}        # the tiny tokenizer needs ~3x the tokens
TINY_SFT = {"BATCH_SIZE": 2, "GRAD_ACCUM": 1, "MAX_SEQ_LENGTH": 2048}

settings = configure(globals())


def tiny_scale() -> bool:
    import torch
    return SCALE == "tiny" or (SCALE == "auto" and not torch.cuda.is_available())


def card_dtype() -> str:
    """The dtype the card computes in (bf16 from compute capability 8.0, fp16 before); fp32 on a CPU."""
    import torch
    if not torch.cuda.is_available():
        return "float32"
    from perm.models import gpu_dtype
    return str(gpu_dtype()).replace("torch.", "")


def shapes_of(check: str) -> tuple[str, str, str]:
    policy, judge, stage_preset = CHECKS[check]
    if tiny_scale():
        policy, judge = TINY[policy], TINY[judge] if judge else ""
    return policy, judge, stage_preset


def model_config(shape: str):
    """The transformers config of a shape, with the tiny alias's tokenizer (padded with placeholder
    tokens to the shape's vocabulary size)."""
    from transformers import AutoConfig, AutoTokenizer
    from perm.models import resolve_model
    tok = AutoTokenizer.from_pretrained(resolve_model("tiny", RUNS_DIR))
    fields = dict(SHAPES[shape])
    fields["vocab_size"] = fields["vocab_size"] or len(tok)
    tok.add_tokens([f"<x{i}>" for i in range(fields["vocab_size"] - len(tok))])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, max_position_embeddings=32768,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    return config, tok


def write_random_model(shape: str, folder: Path, dtype_name: str) -> None:
    """A random-weight model of `shape` written tensor by tensor, in `dtype_name`, into safetensors
    shards of at most SHARD_GB: the model is built on the meta device (`_from_config(config, dtype=)`:
    names and shapes, no memory), and at most one shard is ever in RAM. Norms are ones, biases zeros,
    the rest N(0, 0.02), as an initialization would draw them."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    config, tok = model_config(shape)
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    work = folder.with_name(folder.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(SEED)
    shards, current, size, limit = [], {}, 0, int(SHARD_GB * 1024**3)

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, str(work / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0
    for name, param in model.named_parameters():             # tied weights appear once
        if "norm" in name:
            tensor = torch.ones(param.shape, dtype=dtype)
        elif name.endswith(".bias"):
            tensor = torch.zeros(param.shape, dtype=dtype)
        else:
            tensor = (torch.randn(param.shape, generator=generator, dtype=torch.float32) * 0.02).to(dtype)
        if size and size + tensor.nbytes > limit:
            flush()
        current[name] = tensor
        size += tensor.nbytes
    flush()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    renamed = {}
    for k, (name, keys) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(work / name, work / final)
        renamed.update({key: final for key in keys})
    (work / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": renamed}))
    config.dtype = dtype
    config.save_pretrained(work)
    model.generation_config.save_pretrained(work)
    tok.save_pretrained(work)
    os.replace(work, folder)


def build_models(checks: list[str]) -> dict:
    """shape -> folder of every model the checks need, each written once by a separate process (its
    RAM is returned before any check starts, and nothing of it is on the GPU)."""
    folders = {}
    for check in checks:
        for shape in shapes_of(check)[:2]:
            if not shape or shape in folders:
                continue
            folder = Path(RUNS_DIR) / "gpu_check" / "models" / f"{shape}-{card_dtype()}"
            if not (folder / "config.json").exists():
                print(f"[gpu-check] writing a random {shape} model ({card_dtype()}) to {folder}", flush=True)
                subprocess.run([sys.executable, __file__, f"RUNS_DIR={RUNS_DIR}", f"SEED={SEED}", f"SHARD_GB={SHARD_GB}",
                                f"BUILD={shape}/{card_dtype()}"], check=True, env={**os.environ, "PERM_UNSLOTH": "0"})
            folders[shape] = str(folder.resolve())
    return folders


def stage_settings(script: str, stage_preset: str, tiny: dict) -> tuple[dict, dict]:
    """A stage's (settings, namespace) for its preset, with the toy sizes at tiny scale."""
    stage = stage_namespace(script, stage_preset)
    s = dict(stage["settings"], **(tiny if tiny_scale() else {}))
    return s, stage


def judge_budget(s: dict, tok, cases: list[dict]) -> int:
    from perm.judges import REASON_TOKENS
    from perm.local_judge import request_budget
    return request_budget(tok, cases, s["JUDGE_MODE"], s["PERSPECTIVES"], s["MAX_COMPLETION_LENGTH"], REASON_TOKENS)


def estimate(check: str, path: str) -> dict:
    """`perm.memory.grpo_estimate` for a check's shapes and its stage preset's 04 settings."""
    from perm.memory import Shape, grpo_estimate
    policy, judge, stage_preset = shapes_of(check)
    s, _ = stage_settings("04_grpo.py", stage_preset, TINY_GRPO)
    shape = lambda name: Shape.of(dict(SHAPES[name], vocab_size=SHAPES[name]["vocab_size"] or 1024))
    return grpo_estimate(shape(policy), shape(judge) if judge else None, four_bit=True, lora_r=s["LORA_R"],
                         generations=s["NUM_GENERATIONS"], prompts=s["PROMPTS_PER_STEP"],
                         prompt_tokens=s["MAX_PROMPT_TOKENS"] // 2, completion_tokens=s["MAX_COMPLETION_LENGTH"],
                         judge_batch=s["JUDGE_BATCH_SIZE"], judge_tokens=900 + s["MAX_COMPLETION_LENGTH"],
                         checkpointing=True, unsloth=path == "unsloth", dtype_bytes=4 if card_dtype() == "float32" else 2)


class StepTimes:
    """Wall time of each optimizer step (a TrainerCallback)."""

    def __init__(self):
        from transformers import TrainerCallback
        self.times, self.started = [], None
        times = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                times.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                times.times.append(time.perf_counter() - times.started)
        self.callback = Callback()

    def first(self) -> float:
        return round(self.times[0], 2) if self.times else None

    def rest(self) -> float | None:
        """Mean step time without the first step (compilation and allocator warm-up)."""
        later = self.times[1:]
        return round(sum(later) / len(later), 2) if later else None


def timed_generation(model, tok) -> dict:
    """Wraps `model.generate` (TRL's rollouts call it) to count generated tokens and the seconds
    spent generating, so tokens/s is generation's alone."""
    counts = {"tokens": 0, "seconds": 0.0}
    generate = model.generate

    def timed(*args, **kwargs):
        import torch
        started = time.perf_counter()
        out = generate(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        counts["seconds"] += time.perf_counter() - started
        prompt = kwargs.get("input_ids", args[0] if args else None)
        new = out[:, prompt.shape[1]:] if prompt is not None else out
        counts["tokens"] += int((new != tok.pad_token_id).sum())
        return out
    model.generate = timed
    return counts


def memory_now() -> dict:
    import torch
    if not torch.cuda.is_available():
        return {}
    return {"reserved_gb": round(torch.cuda.max_memory_reserved() / 1024**3, 2)}


def check_one(check: str, path: str) -> dict:
    """SFT then GRPO steps for one check on the current path (decided at import by PERM_UNSLOTH)."""
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer, SFTTrainer
    from perm.judges import judge_from_settings
    from perm.prompts import format_answer, policy_prompt
    from perm.reward import PermScorer, RewardSettings, make_reward_functions
    from perm.training import kl_reference, load_policy, peak_memory_gb
    policy_shape, judge_shape, stage_preset = shapes_of(check)
    models = build_models([check])
    work = Path(RUNS_DIR) / "gpu_check" / "work" / f"{check}-{path}"
    cases = [json.loads(line) for line in (REPO / "data" / "cases.jsonl").read_text().splitlines()[:16]]
    out = {"preset": check, "path": path, "stage_preset": stage_preset, "policy": policy_shape,
           "judge": judge_shape or "policy base"}
    if torch.cuda.is_available():
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        out["cuda_context_gb"] = round((total - free - torch.cuda.memory_reserved()) / 1024**3, 2)

    # SFT: 02's config and length on the policy shape
    sft_s, sft_stage = stage_settings("02_sft.py", stage_preset, TINY_SFT)
    sft_s.update(MAX_STEPS=SFT_STEPS)
    model, tok = load_policy(models[policy_shape], RUNS_DIR, sft_s["MAX_SEQ_LENGTH"], sft_s["LORA_R"],
                             sft_s["LORA_ALPHA"], SEED, load_in_4bit=sft_s["LOAD_IN_4BIT"])
    pairs = [{"prompt": policy_prompt(c), "completion": [{"role": "assistant", "content": c["reference"]}]}
             for c in cases]
    steps = StepTimes()
    trainer = SFTTrainer(model=model, args=sft_stage["sft_config"](sft_s, str(work / "sft-out")),
                         train_dataset=Dataset.from_list(pairs), processing_class=tok, callbacks=[steps.callback])
    trainer.train()
    out["sft_first_step_s"], out["sft_step_s"] = steps.first(), steps.rest()
    adapter = work / "sft-adapter"
    trainer.model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    out["sft_peak_reserved_gb"] = memory_now().get("reserved_gb")
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # GRPO: 04 with INIT=sft, in 04's order: a separate judge first, the policy at 04's length, the KL reference
    s, grpo_stage = stage_settings("04_grpo.py", stage_preset, TINY_GRPO)
    s.update(MAX_STEPS=GRPO_STEPS, SAVE_STEPS=1000)
    cache = str(work / "cache.sqlite")
    judge = None if not judge_shape else judge_from_settings(s, backend="local", model=models[judge_shape],
                                                              mode="direct", cache_path=cache)
    length = s["MAX_PROMPT_TOKENS"] + s["MAX_COMPLETION_LENGTH"]
    if not judge_shape:
        length = max(length, judge_budget(s, tok, cases))
    out["policy_max_seq_length"] = length
    model, tok = load_policy(models[policy_shape], RUNS_DIR, length, s["LORA_R"], s["LORA_ALPHA"], SEED, str(adapter),
                             checkpointing=s["GRADIENT_CHECKPOINTING"], load_in_4bit=s["LOAD_IN_4BIT"])
    kl_reference(model, s["BETA"])
    if judge is None:
        judge = judge_from_settings(s, backend="local", model=models[policy_shape], mode="direct",
                                    local_model=(model, tok), cache_path=cache)
    out["judge_precision"], out["judge_loader"] = judge.identity["precision"], judge.identity["loader"]

    class JudgeEverything(PermScorer):
        def score(self, cases, completions, completion_tokens, judge_unformatted=True, neutralized=True):
            return super().score(cases, completions, completion_tokens, judge_unformatted=True)
    scorer = JudgeEverything(judge, RewardSettings.from_settings(s), auto_check=False)
    generation = timed_generation(model, tok)
    steps = StepTimes()
    train = Dataset.from_list([dict(c, prompt=policy_prompt(c)) for c in cases])
    trainer = GRPOTrainer(model=model, reward_funcs=make_reward_functions(scorer),
                          args=grpo_stage["grpo_config"](s, str(work / "grpo-out")), train_dataset=train,
                          processing_class=tok, callbacks=[steps.callback])
    trainer.train()
    out["grpo_first_step_s"], out["grpo_step_s"] = steps.first(), steps.rest()
    out["generated_tokens_per_s"] = (round(generation["tokens"] / generation["seconds"], 1)
                                     if generation["seconds"] else None)
    first = next((e for e in trainer.state.log_history if "kl" in e), {})
    out["kl_first_step"] = first.get("kl")
    out["kl_reference"] = "ref adapter" if "ref" in getattr(model, "peft_config", {}) else "adapters disabled"

    # The judge alone, and distinct answers in the policy's training state
    model.train()
    answers = [format_answer(c["reference"][:200], c["reference"][200:600]) for c in cases[:4]]
    judge.cache = None                                   # time real judgments, not cache reads
    before, started = judge.stats.judgments, time.time()
    results = scorer.score(cases[:4], answers, [100] * len(answers))
    out["judgments_per_s"] = round((judge.stats.judgments - before) / (time.time() - started), 2)
    bystander = [tuple(round(v, 4) for v in r.subscores.values()) for r in results]
    out["distinct_bystander_scores"] = len(set(bystander)) == len(bystander)
    out["still_in_training_state"] = model.training
    if torch.cuda.is_available():
        reserved = max(memory_now()["reserved_gb"], out["sft_peak_reserved_gb"])
        out["peak_gb"], out["peak_source"] = round(reserved + out["cuda_context_gb"], 2), "reserved + CUDA context"
    else:
        out["peak_gb"], out["peak_source"] = peak_memory_gb(), "peak RSS (CPU)"
    return out


def stage_namespace(script: str, preset: str) -> dict:
    """A stage's settings and functions for a preset, read without running it."""
    from perm.settings import run_stage_file
    return run_stage_file(REPO / script, f"PRESET={preset}", f"RUNS_DIR={RUNS_DIR}")


KEYS = ("estimate_gb", "peak_gb", "sft_step_s", "grpo_first_step_s", "grpo_step_s", "generated_tokens_per_s",
        "judgments_per_s", "kl_first_step", "distinct_bystander_scores")


def main():
    if BUILD:
        shape, dtype = BUILD.split("/")
        write_random_model(shape, Path(RUNS_DIR) / "gpu_check" / "models" / f"{shape}-{dtype}", dtype)
        return
    if ONE:
        check, path = ONE.split("/")
        print("GPU_CHECK_RESULT " + json.dumps(check_one(check, path)), flush=True)
        return
    from importlib.util import find_spec
    build_models(PRESETS_TO_CHECK)
    runs = [(c, p) for c in PRESETS_TO_CHECK for p in PATHS]
    estimates = {}
    print("[gpu-check] memory estimates (GB; perm.memory), before running:")
    for check, path in runs:
        estimates[check, path] = estimate(check, path)
        terms = ", ".join(f"{k} {v}" for k, v in estimates[check, path].items() if k != "total")
        print(f"[gpu-check]   {check}/{path} ({' + '.join(shapes_of(check)[:2]).strip(' +')}): "
              f"{estimates[check, path]['total']} GB = {terms}")
    results = []
    for check, path in runs:
        if path == "unsloth" and find_spec("unsloth") is None:
            print(f"[gpu-check] {check}/unsloth: skipped (Unsloth is not installed: make setup-gpu)")
            continue
        env = dict(os.environ, PERM_UNSLOTH="1" if path == "unsloth" else "0")
        command = [sys.executable, __file__, f"RUNS_DIR={RUNS_DIR}", f"SCALE={SCALE}", f"SEED={SEED}",
                   f"SFT_STEPS={SFT_STEPS}", f"GRPO_STEPS={GRPO_STEPS}", f"SHARD_GB={SHARD_GB}", f"ONE={check}/{path}"]
        print(f"[gpu-check] {check}/{path} ...", flush=True)
        proc = subprocess.run(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("GPU_CHECK_RESULT ")), None)
        if proc.returncode or line is None:
            tail = "\n".join(proc.stdout.splitlines()[-15:])
            results.append({"preset": check, "path": path, "error": tail[-1500:]})
            print(f"[gpu-check] {check}/{path} FAILED:\n{tail}")
            continue
        results.append(dict(json.loads(line.split(" ", 1)[1]), estimate_gb=estimates[check, path]["total"],
                            estimate=estimates[check, path]))
    out = Path(RUNS_DIR) / "gpu_check" / f"{TAG}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| preset/path | " + " | ".join(KEYS) + " |\n" + "|---" * (len(KEYS) + 1) + "|")
    for r in results:
        print(f"| {r['preset']}/{r['path']} | " + " | ".join(str(r.get(k, "error")) for k in KEYS) + " |")
    measured = next((r.get("peak_source") for r in results if "peak_source" in r), "")
    print(f"[gpu-check] peak_gb: {measured}; estimate_gb: perm.memory's sum for the same shapes and settings")
    print(f"[gpu-check] wrote {out}")
    if any("error" in r or not r.get("distinct_bystander_scores") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()

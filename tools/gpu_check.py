"""Does a preset fit this GPU, and how fast is it? A few SFT and GRPO steps per preset, offline.

    python tools/gpu_check.py                    # CUDA: gpu16 then gpu24 shapes, Unsloth and plain paths
    make gpu-check                               # the same, after `make setup-gpu`
    python tools/gpu_check.py SCALE=tiny         # CPU: the same code at toy scale (the test suite runs it)

No model hub is needed: models are random-weight Qwen2.5 shapes built in code (the real vocabulary
size, hidden sizes and layer counts), which is all that step time and memory depend on. For each
preset and path it runs SFT_STEPS of 02's SFT and GRPO_STEPS of 04's GRPO with the in-process local
judge of that preset (the policy's base, or a separate judge of the preset's judge shape, in 4-bit
beside it), then prints step times, generation tokens/s, judge judgments/s, peak GPU memory, and
whether distinct answers got distinct bystander scores with the policy in its training state.
Answers of a random model are never in the two-section format, so here every answer is judged
whole (04 would give them the format floor without judge calls): the judge works every step.

Each path runs in its own process (Unsloth must be imported before transformers, or not at all);
results go to RUNS_DIR/gpu_check/<TAG>.json.
"""
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
PRESETS_TO_CHECK = ["gpu16", "gpu24"]
PATHS = ["unsloth", "plain"]   # unsloth runs only where it is installed (make setup-gpu)
SFT_STEPS = 3
GRPO_STEPS = 2
ONE = ""                       # internal: "preset/path" runs one check in this process

# Real shapes of the presets' models (Qwen2.5 configs), and their judges ("" = the policy's base).
SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=0, tie_word_embeddings=True),     # 0: the tokenizer's own
}
CHECKS = {   # preset -> (policy shape, judge shape, the 04 settings it trains with)
    "gpu16": ("qwen2.5-1.5b", "qwen2.5-7b", {"NUM_GENERATIONS": 6, "PROMPTS_PER_STEP": 2, "GRAD_ACCUM": 4,
                                             "MAX_COMPLETION_LENGTH": 512, "JUDGE_BATCH_SIZE": 8}),
    "gpu24": ("qwen2.5-7b", "", {"NUM_GENERATIONS": 8, "PROMPTS_PER_STEP": 2, "GRAD_ACCUM": 4,
                                 "MAX_COMPLETION_LENGTH": 768, "JUDGE_BATCH_SIZE": 8}),
}

settings = configure(globals())


def build_model(shape: str, folder: Path) -> str:
    """A random-weight Qwen2 model of `shape`, saved once, with the tiny alias's ChatML tokenizer
    padded with placeholder tokens to the shape's vocabulary size."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    from perm.models import resolve_model
    if (folder / "config.json").exists():
        return str(folder)
    tok = AutoTokenizer.from_pretrained(resolve_model("tiny", RUNS_DIR))
    shape_config = dict(SHAPES[shape], vocab_size=SHAPES[shape]["vocab_size"] or len(tok))
    config = Qwen2Config(**shape_config, max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    tok.add_tokens([f"<x{i}>" for i in range(config.vocab_size - len(tok))])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(SEED)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    work = folder.with_name(folder.name + ".partial")
    model.save_pretrained(work)
    tok.save_pretrained(work)
    del model
    os.replace(work, folder)
    return str(folder)


def check_one(preset: str, path: str) -> dict:
    """SFT and GRPO steps for one preset on the current path (decided at import by PERM_UNSLOTH)."""
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer, SFTTrainer
    from perm.judges import judge_from_settings
    from perm.prompts import format_answer, policy_prompt
    from perm.reward import PermScorer, RewardSettings, make_reward_functions
    from perm.training import load_policy
    tiny = SCALE == "tiny" or (SCALE == "auto" and not torch.cuda.is_available())
    policy_shape, judge_shape, grpo = CHECKS[preset]
    if tiny:
        policy_shape, judge_shape = "tiny", ("tiny" if judge_shape else "")
        grpo = dict(grpo, NUM_GENERATIONS=2, PROMPTS_PER_STEP=2, GRAD_ACCUM=1, MAX_COMPLETION_LENGTH=16,
                    JUDGE_BATCH_SIZE=4)
    models = Path(RUNS_DIR) / "gpu_check" / "models"
    policy_path = build_model(policy_shape, models / policy_shape)
    cases = [json.loads(line) for line in (REPO / "data" / "cases.jsonl").read_text().splitlines()[:16]]
    out = {"preset": preset, "path": path, "policy": policy_shape, "judge": judge_shape or "policy base"}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    # SFT: 02's config on the policy shape
    sft_stage = stage_namespace("02_sft.py", preset)
    model, tok = load_policy(policy_path, RUNS_DIR, 1024, 16, 32, SEED)
    pairs = [{"prompt": policy_prompt(c), "completion": [{"role": "assistant", "content": c["reference"]}]}
             for c in cases]
    sft_settings = dict(sft_stage["settings"], MAX_STEPS=SFT_STEPS, BATCH_SIZE=2 if tiny else 4, GRAD_ACCUM=1,
                        MAX_SEQ_LENGTH=1024)
    trainer = SFTTrainer(model=model, args=sft_stage["sft_config"](sft_settings, str(models / "sft-out")),
                         train_dataset=Dataset.from_list(pairs), processing_class=tok)
    started = time.time()
    trainer.train()
    out["sft_step_s"] = round((time.time() - started) / SFT_STEPS, 2)

    # GRPO: 04's config, the in-process judge of the preset, every answer judged
    grpo_stage = stage_namespace("04_grpo.py", preset)
    s = dict(grpo_stage["settings"], **grpo, MAX_STEPS=GRPO_STEPS, SAVE_STEPS=1000)
    if judge_shape:
        judge = judge_from_settings(s, backend="local", model=build_model(judge_shape, models / judge_shape),
                                    mode="direct", cache_path=str(models / "cache.sqlite"))
    else:
        judge = judge_from_settings(s, backend="local", model=policy_path, mode="direct", local_model=(model, tok),
                                    cache_path=str(models / "cache.sqlite"))

    class JudgeEverything(PermScorer):
        def score(self, cases, completions, completion_tokens, judge_unformatted=True):
            return super().score(cases, completions, completion_tokens, judge_unformatted=True)
    scorer = JudgeEverything(judge, RewardSettings.from_settings(s), auto_check=False)
    generated = {"tokens": 0}

    def count(texts, results, cases_):
        generated["tokens"] += sum(r.completion_tokens for r in results)
    train = Dataset.from_list([dict(c, prompt=policy_prompt(c)) for c in cases])
    trainer = GRPOTrainer(model=model, reward_funcs=make_reward_functions(scorer, on_scored=count),
                          args=grpo_stage["grpo_config"](s, str(models / "grpo-out")), train_dataset=train,
                          processing_class=tok)
    started = time.time()
    trainer.train()
    elapsed = time.time() - started
    out["grpo_step_s"] = round(elapsed / GRPO_STEPS, 2)
    out["generated_tokens_per_s"] = round(generated["tokens"] / elapsed, 1)

    # The judge alone, and distinct answers in the policy's training state
    model.train()
    answers = [format_answer(c["reference"][:200], c["reference"][200:600]) for c in cases[:4]]
    judge_cases = cases[:4]
    judge.cache = None                                   # time real judgments, not cache reads
    before, started = judge.stats.judgments, time.time()
    results = scorer.score(judge_cases, answers, [100] * len(answers))
    out["judgments_per_s"] = round((judge.stats.judgments - before) / (time.time() - started), 2)
    bystander = [tuple(round(v, 4) for v in r.subscores.values()) for r in results]
    out["distinct_bystander_scores"] = len(set(bystander)) == len(bystander)
    out["still_in_training_state"] = model.training
    out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2) if torch.cuda.is_available() else None
    return out


def stage_namespace(script: str, preset: str) -> dict:
    """A stage's settings and functions for a preset, read without running it."""
    from perm.settings import run_stage_file
    return run_stage_file(REPO / script, f"PRESET={preset}", f"RUNS_DIR={RUNS_DIR}")


def main():
    if ONE:
        preset, path = ONE.split("/")
        print("GPU_CHECK_RESULT " + json.dumps(check_one(preset, path)), flush=True)
        return
    from importlib.util import find_spec
    results = []
    for preset in PRESETS_TO_CHECK:
        for path in PATHS:
            if path == "unsloth" and find_spec("unsloth") is None:
                print(f"[gpu-check] {preset}/unsloth: skipped (Unsloth is not installed: make setup-gpu)")
                continue
            env = dict(os.environ, PERM_UNSLOTH="1" if path == "unsloth" else "0")
            command = [sys.executable, __file__, f"RUNS_DIR={RUNS_DIR}", f"SCALE={SCALE}", f"SEED={SEED}",
                       f"SFT_STEPS={SFT_STEPS}", f"GRPO_STEPS={GRPO_STEPS}", f"ONE={preset}/{path}"]
            print(f"[gpu-check] {preset}/{path} ...", flush=True)
            proc = subprocess.run(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("GPU_CHECK_RESULT ")), None)
            if proc.returncode or line is None:
                tail = "\n".join(proc.stdout.splitlines()[-15:])
                results.append({"preset": preset, "path": path, "error": tail[-1500:]})
                print(f"[gpu-check] {preset}/{path} FAILED:\n{tail}")
                continue
            results.append(json.loads(line.split(" ", 1)[1]))
    out = Path(RUNS_DIR) / "gpu_check" / f"{TAG}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    keys = ("sft_step_s", "grpo_step_s", "generated_tokens_per_s", "judgments_per_s",
            "peak_gpu_memory_gb", "distinct_bystander_scores")
    print("\n| preset/path | " + " | ".join(keys) + " |\n|---" * 1 + "|---" * len(keys) + "|")
    for r in results:
        print(f"| {r['preset']}/{r['path']} | " + " | ".join(str(r.get(k, "error")) for k in keys) + " |")
    print(f"[gpu-check] wrote {out}")
    if any("error" in r or not r.get("distinct_bystander_scores") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()

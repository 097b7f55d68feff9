"""The GPU path, checked on a CPU: the training state a judge meets during GRPO, device placement
and precision decisions on a (patched) CUDA machine, the objective both paths train, several
processes, and the vLLM command. Each test fails on a defect that only a GPU run would show."""
import json
import runpy
import sys
from unittest import mock

import pytest
import torch
import transformers.training_args as targs

from conftest import REPO, judge_for_test, reward_settings

CASES = [json.loads(line) for line in (REPO / "data" / "cases.jsonl").read_text().splitlines()[:3]]
ANSWERS = ["# Analysis\nHe feels guilty and defensive.\n# Response\nYou did the right thing; the owner chose the sack.",
           "# Analysis\nShe is tired.\n# Response\nGo to bed early and drink water.",
           "# Analysis\nNothing much.\n# Response\nOk."]


def judged(judge):
    from perm.reward import PermScorer
    results = PermScorer(judge, reward_settings()).score(CASES, ANSWERS, [40, 40, 40])
    return [(r.scores, r.subscores) for r in results]


def test_judge_scores_are_the_same_in_training_state_with_checkpointing(runs_dir):
    """04 judges with the policy it trains: in train mode with gradient checkpointing on, a shared-
    prefix KV cache stays empty and every answer got the same bystander score."""
    from perm.training import load_policy
    model, tok = load_policy("tiny", runs_dir, 1024, 4, 8, 0, checkpointing=True, load_in_4bit=None)
    assert model.training and model.base_model.model.model.gradient_checkpointing
    training = judged(judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3, local_model=(model, tok),
                                 cache_path=str(runs_dir / "a.sqlite")))
    assert model.training                                   # the training state is given back
    model.eval()
    model.base_model.model.gradient_checkpointing_disable()
    inference = judged(judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3, local_model=(model, tok),
                                  cache_path=str(runs_dir / "b.sqlite")))
    for (scores_t, subs_t), (scores_i, subs_i) in zip(training, inference):
        assert scores_t == pytest.approx(scores_i, abs=1e-4) and subs_t == pytest.approx(subs_i, abs=1e-3)
    bystander = [tuple(round(v, 4) for v in subs.values()) for _, subs in training]
    assert len(set(bystander)) == len(bystander)             # distinct answers, distinct criteria scores


def test_judge_reads_logits_at_the_last_position_only(runs_dir):
    judge = judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3, cache_path=str(runs_dir / "c.sqlite"))
    model, seen = judge.backend.model, []
    forward = model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append((kwargs.get("logits_to_keep"), out.logits.shape[1]))
        return out
    with mock.patch.object(model, "forward", spy):
        judged(judge)
    assert seen and all(keep == 1 and positions == 1 for keep, positions in seen)


def test_judge_generation_inputs_go_to_the_model_device(runs_dir):
    """Unsloth's generate does not move inputs: the judge must put them on the model's device."""
    from perm.local_judge import LocalBackend
    from perm.protocol import text_request
    judge = judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3, cache_path=str(runs_dir / "d.sqlite"))
    devices = []

    def generate(input_ids, attention_mask, **kwargs):
        devices.append((input_ids.device.type, attention_mask.device.type))
        return torch.zeros((input_ids.shape[0], input_ids.shape[1] + 1), dtype=torch.long)
    with mock.patch.object(LocalBackend, "device", torch.device("meta")), \
            mock.patch.object(judge.backend.model, "generate", generate):
        judge.judge([text_request([{"role": "user", "content": "hi"}], 4, 0.0)])
    assert devices == [("meta", "meta")]


def cuda_machine(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # torch says yes on a T4


@pytest.mark.parametrize("capability, dtype, mixed", [((7, 5), torch.float16, "fp16"),
                                                       ((8, 0), torch.bfloat16, "bf16")])
def test_gpu_precision_follows_compute_capability(monkeypatch, capability, dtype, mixed):
    from perm.models import inference_kwargs
    from perm.training import precision
    cuda_machine(monkeypatch, capability)
    assert precision() == {"bf16": mixed == "bf16", "fp16": mixed == "fp16"}
    kwargs = inference_kwargs(None)
    assert kwargs["dtype"] == dtype and kwargs["device_map"] == {"": 0}          # on the GPU, never fp32 on the CPU
    assert kwargs["quantization_config"].load_in_4bit
    assert kwargs["quantization_config"].bnb_4bit_compute_dtype == dtype
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert inference_kwargs(False) == {"dtype": dtype, "device_map": {"": 1}}


def test_local_models_load_through_the_gpu_aware_path(runs_dir, monkeypatch):
    """The judge, teacher, eval and serve models all load through `load_model`, which asks
    `inference_kwargs` (fp32 here; 4-bit on the GPU of a CUDA machine, or with LOAD_IN_4BIT=True)."""
    from perm import models
    asked = []
    real = models.inference_kwargs
    monkeypatch.setattr(models, "inference_kwargs", lambda load_in_4bit: asked.append(load_in_4bit) or real(load_in_4bit))
    judge = judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3, cache_path=str(runs_dir / "e.sqlite"))
    assert asked == [None] and judge.identity["precision"] == "float32"     # 04's LOAD_IN_4BIT: 4-bit with CUDA


def grpo_config_for(preset, world_size=1, vllm_memory=None, **overrides):
    from perm.settings import run_stage_file
    stage = run_stage_file(REPO / "04_grpo.py", f"PRESET={preset}", *(f"{k}={v}" for k, v in overrides.items()))
    with mock.patch.object(targs.TrainingArguments, "world_size", property(lambda self: world_size)):
        return stage["grpo_config"](stage["settings"], "/tmp/x", vllm_memory), stage["settings"]


@pytest.mark.parametrize("preset", ["cpu", "gpu16", "gpu24"])
def test_both_paths_train_the_same_objective(preset, monkeypatch):
    """Unsloth's config replaces TRL's defaults unless each is set explicitly."""
    if preset.startswith("gpu"):   # as a CUDA machine with bf16 would build it
        from perm import training
        monkeypatch.setattr(training, "precision", lambda: {"bf16": True, "fp16": False})
        monkeypatch.setattr(training, "gradient_checkpointing", lambda s: True if s is None else bool(s))
        monkeypatch.setattr(targs, "is_torch_bf16_gpu_available", lambda: True)
    config, s = grpo_config_for(preset)
    assert config.mask_truncated_completions is False and config.epsilon == 0.2 and config.epsilon_high == 0.2
    assert config.optim == "adamw_torch" and config.weight_decay == 0.0
    assert config.beta == 0.01 and config.loss_type == "dapo" and config.scale_rewards == "group"
    assert config.lr_scheduler_type == "linear" and config.warmup_steps == 0.1
    assert config.gradient_checkpointing == preset.startswith("gpu")
    assert config.bf16 == preset.startswith("gpu") and config.use_cpu == (preset == "cpu")


def test_several_processes_build_a_valid_config():
    """`accelerate launch --num_processes 2 04_grpo.py`: each process generates its own groups."""
    config, s = grpo_config_for("cpu", world_size=2)
    per_step = s["PROMPTS_PER_STEP"] * s["NUM_GENERATIONS"]
    assert config.generation_batch_size == 2 * per_step and config.steps_per_generation == s["PROMPTS_PER_STEP"]


def test_gradient_checkpointing_and_fast_inference_settings_reach_the_config():
    config, _ = grpo_config_for("cpu", vllm_memory=0.31, GRADIENT_CHECKPOINTING=True, FAST_INFERENCE=True)
    assert config.gradient_checkpointing and config.use_vllm and config.vllm_mode == "colocate"
    assert config.vllm_gpu_memory_utilization == 0.31                    # what 04 sized, not half the card


def test_fast_inference_without_vllm_says_what_to_install(runs_dir):
    from perm.training import load_policy
    with mock.patch("perm.training.find_spec", lambda name: None), pytest.raises(SystemExit, match="vllm==0.32.0"):
        load_policy("tiny", runs_dir, 256, 4, 8, 0, fast_inference=True, load_in_4bit=None)


def test_vllm_serve_command_passes_the_adapter_rank(runs_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 24}))
    with mock.patch.object(sys, "argv", ["serve.py", f"RUNS_DIR={runs_dir}"]):
        serve = runpy.run_path(str(REPO / "tools" / "serve.py"), run_name="not_main")
    command = serve["vllm_command"]("tiny", str(adapter))
    assert command[command.index("--max-lora-rank") + 1] == "32"           # 24 rounded up to what vLLM takes
    assert command[2] == str(runs_dir / "models" / "tiny") or command[2].endswith("/tiny")  # the alias's folder


def test_gpu_check_runs_at_tiny_scale_on_cpu(runs_dir):
    """tools/gpu_check.py is the same code a GPU runs; here at toy scale, on the plain path, for every
    check (a separate judge, the shared one, the Qwen3 candidate), printing every figure."""
    from conftest import run_stage
    proc = run_stage("tools/gpu_check.py", f"RUNS_DIR={runs_dir}", "SCALE=tiny", 'PATHS=["plain"]', "SFT_STEPS=2",
                     "GRPO_STEPS=2")
    results = {r["preset"]: r for r in json.loads((runs_dir / "gpu_check" / "default.json").read_text())}
    assert set(results) == {"gpu16", "gpu24", "candidate"}
    assert results["gpu16"]["judge"] == "tiny" and results["gpu24"]["judge"] == "policy base"
    assert results["candidate"]["policy"] == "tiny-qwen3" and results["candidate"]["judge"] == "tiny-qwen3"
    for r in results.values():
        for key in ("estimate_gb", "peak_gb", "sft_step_s", "grpo_first_step_s", "grpo_step_s",
                    "generated_tokens_per_s", "judgments_per_s"):
            assert r[key] > 0, key
        assert r["kl_first_step"] == pytest.approx(0.0, abs=1e-4)            # the reference is the starting policy
        assert r["kl_reference"] == "ref adapter" and r["distinct_bystander_scores"] and r["still_in_training_state"]
    printed = proc.stdout
    assert "memory estimates" in printed.split("| preset/path")[0]        # the estimate before, the peak beside it
    for line in [l for l in printed.splitlines() if l.startswith("| gpu") or l.startswith("| candidate")]:
        assert "None" not in line and "error" not in line, line
    assert results["gpu24"]["policy_max_seq_length"] >= 2048 + 16           # the stage's real length (a judge request, if longer)


def gpu_check_namespace(*argv):
    with mock.patch.object(sys, "argv", ["gpu_check.py", *argv]):
        return runpy.run_path(str(REPO / "tools" / "gpu_check.py"), run_name="not_main")


def test_gpu_check_writes_random_models_on_the_cpu_in_the_cards_dtype_tensor_by_tensor(runs_dir, monkeypatch):
    """A 7B shape built on the GPU in fp32 and cast needs 45 GB: the model is written on the CPU in
    the card's dtype, one tensor at a time into shards, so neither the GPU nor a 12 GB host holds it."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    ns = gpu_check_namespace(f"RUNS_DIR={runs_dir}", "SHARD_GB=0.00002")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)    # as on a GPU machine: nothing may go there
    created = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: created.append(k.get("device")) or real_empty(*a, **k))
    folder = runs_dir / "gpu_check" / "models" / "tiny-bf16"
    ns["write_random_model"]("tiny", folder, "bfloat16")
    assert all(d is None or str(d) in ("cpu", "meta") for d in created)
    shards = sorted(folder.glob("model-*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) > 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    monkeypatch.undo()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2


def test_memory_arithmetic_matches_the_real_shapes():
    """perm.memory counts parameters as the models have them (a 7B and a 1.5B built on the meta
    device: no memory), and the terms the plain path's fixes change: embeddings and head in bf16
    (2.2 GB on a 7B, 4.4 GB upcast to fp32), and the loss's logits for one group, not the whole batch."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from perm.memory import GB, Shape, grpo_estimate, logits_gb, weights_gb
    ns = gpu_check_namespace()
    for name in ("qwen2.5-7b", "qwen2.5-1.5b"):
        fields = {k: v for k, v in ns["SHAPES"][name].items() if k != "model_type"}
        with torch.device("meta"):
            model = Qwen2ForCausalLM(Qwen2Config(**fields))
        shape = Shape.of(model.config)
        linear = sum(p.numel() for n, p in model.named_parameters() if "proj.weight" in n)
        embeddings = sum(p.numel() for n, p in model.named_parameters() if "embed" in n or "lm_head" in n)
        assert shape.linear_params() == linear and shape.embedding_params() == embeddings
    seven = Shape.of(ns["SHAPES"]["qwen2.5-7b"])
    assert seven.embedding_params() * 2 / 1e9 == pytest.approx(2.18, abs=0.01)         # bf16, kept
    assert weights_gb(seven, True) * GB / 1e9 == pytest.approx(5.4, abs=0.2)           # the 4-bit 7B
    # gpu24: one group of 8 answers x 769 positions x 152,064 logits in bf16, with their gradient
    assert logits_gb(seven, 8, 769) == pytest.approx(2 * 8 * 769 * 152064 * 2 / GB)
    estimate = grpo_estimate(seven, None, four_bit=True, lora_r=16, generations=8, prompts=2, prompt_tokens=400,
                             completion_tokens=768, judge_batch=8, judge_tokens=1500, checkpointing=True, unsloth=False)
    assert estimate["loss_logits"] == pytest.approx(3.49, abs=0.01) and estimate["total"] < 24


def test_plain_path_keeps_the_compute_dtype_for_weights_it_does_not_quantize(runs_dir, monkeypatch):
    """prepare_model_for_kbit_training upcast embeddings, head and norms to fp32: twice their memory,
    fp32 logits, and a judge cache key of `4bit-float32` that re-runs the battery."""
    from perm import models
    from perm.models import model_precision
    from perm.training import load_policy
    monkeypatch.setattr(models, "compute_dtype", lambda: torch.bfloat16)      # a bf16 card's compute dtype
    model, tok = load_policy("tiny", runs_dir, 1024, 4, 8, 0, checkpointing=True, load_in_4bit=True)
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert {p.dtype for n, p in base.items() if type(p).__name__ != "Params4bit"} == {torch.bfloat16}
    assert any(type(p).__name__ == "Params4bit" for p in base.values())
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert not any(p.requires_grad for p in base.values())
    assert model_precision(model) == "4bit-bfloat16"


def test_the_loss_runs_one_group_per_forward_with_the_same_optimizer_step():
    """The plain path's loss holds full-vocabulary logits for its micro-batch: one group, while an
    optimizer step still sees PROMPTS_PER_STEP x GRAD_ACCUM groups."""
    config, s = grpo_config_for("gpu24")
    assert config.per_device_train_batch_size == s["NUM_GENERATIONS"] == 8
    assert config.steps_per_generation == s["PROMPTS_PER_STEP"]
    assert config.generation_batch_size == s["PROMPTS_PER_STEP"] * s["NUM_GENERATIONS"]
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == \
        s["PROMPTS_PER_STEP"] * s["NUM_GENERATIONS"] * s["GRAD_ACCUM"]
    assert config.gradient_accumulation_steps % config.steps_per_generation == 0   # no stale old log-probs


# Unsloth 2026.10.9 (unsloth/models/rl.py) rewrites the defaults of GRPOConfig's signature with these
# and, under loss_type dapo, fills mask_truncated_completions=True and epsilon_high=0.28 when unset.
UNSLOTH_CONFIG_DEFAULTS = {"logging_nan_inf_filter": False, "per_device_train_batch_size": 4,
                           "gradient_accumulation_steps": 2, "weight_decay": 0.001, "seed": 3407,
                           "optim": "adamw_8bit", "learning_rate": 5e-05, "num_generations": 8,
                           "vllm_mode": "colocate", "bf16": False, "fp16": False, "warmup_steps": 0.1,
                           "loss_type": None, "beta": None, "vllm_importance_sampling_correction": False,
                           "router_aux_loss_coef": 0.0, "mask_truncated_completions": None}
LOSS_FIELDS = ("beta", "loss_type", "scale_rewards", "epsilon", "epsilon_high", "delta", "mask_truncated_completions",
               "importance_sampling_level", "top_entropy_quantile", "entropy_coef", "use_adaptive_entropy",
               "use_bias_correction_kl", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
               "vllm_importance_sampling_cap", "off_policy_mask_threshold", "num_iterations", "optim", "weight_decay",
               "learning_rate", "lr_scheduler_type", "warmup_steps", "max_grad_norm", "adam_beta1", "adam_beta2",
               "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "num_generations",
               "max_completion_length", "per_device_train_batch_size", "gradient_accumulation_steps",
               "steps_per_generation", "generation_batch_size", "reward_weights", "multi_objective_aggregation",
               "router_aux_loss_coef", "logging_nan_inf_filter", "cast_lm_head_to_fp32", "disable_dropout", "seed")


@pytest.mark.parametrize("preset", ["cpu", "gpu16", "gpu24"])
def test_both_paths_build_the_same_loss_config(preset, monkeypatch):
    """The config Unsloth's patched GRPOConfig builds from 04's arguments equals TRL's in every
    field the loss reads: what 04 leaves unset takes Unsloth's defaults on one path only."""
    import trl
    from trl import GRPOConfig
    seen = {}
    monkeypatch.setattr(trl, "GRPOConfig", lambda **kw: seen.update(kw) or GRPOConfig(**kw))
    plain, s = grpo_config_for(preset)
    kwargs = {**UNSLOTH_CONFIG_DEFAULTS, **seen}
    if kwargs["loss_type"] in (None, "dapo"):
        kwargs["mask_truncated_completions"] = True if kwargs["mask_truncated_completions"] is None \
            else kwargs["mask_truncated_completions"]
        kwargs["epsilon_high"] = 0.28 if kwargs.get("epsilon_high") is None else kwargs["epsilon_high"]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    unsloth = GRPOConfig(**kwargs)
    assert {f: getattr(unsloth, f) for f in LOSS_FIELDS} == {f: getattr(plain, f) for f in LOSS_FIELDS}
    assert plain.use_bias_correction_kl is False                         # the KL term as the paper's TRL 0.25 ran it
    assert plain.logging_nan_inf_filter is False                         # a NaN loss reaches StopGuard


def sft_adapter(runs_dir, tmp_path):
    """A tiny SFT adapter whose LoRA is not zero: the SFT policy differs from the base."""
    from perm.training import load_policy
    model, tok = load_policy("tiny", runs_dir, 1024, 4, 8, 0, load_in_4bit=None)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    return str(tmp_path / "sft")


def logps(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits.float(), -1)


def test_kl_reference_is_the_starting_policy_on_both_paths(runs_dir, tmp_path, monkeypatch):
    """Plain path: TRL copies the SFT adapter into a frozen "ref". Unsloth path: unsloth_zoo deletes
    that copy and TRL's reference scoring falls back to the base; kl_reference makes the same copy,
    and TRL's `use_adapter(model, "ref" if "ref" in peft_config else None)` then scores the SFT policy."""
    from datasets import Dataset
    from trl import GRPOTrainer
    from trl.trainer.utils import use_adapter
    from perm import training
    from perm.training import kl_reference, load_policy
    adapter = sft_adapter(runs_dir, tmp_path)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model, tok = load_policy("tiny", runs_dir, 1024, 4, 8, 0, adapter, load_in_4bit=None)
    start = logps(model, ids)
    with model.disable_adapter():
        base = logps(model, ids)
    assert not torch.allclose(start, base, atol=1e-3)                     # SFT changed the policy
    config, _ = grpo_config_for("cpu")
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                          train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4), processing_class=tok)
    with use_adapter(trainer.model, "ref" if "ref" in trainer.model.peft_config else None):
        assert torch.allclose(logps(trainer.model, ids), start, atol=1e-5)   # plain: the starting policy

    model, tok = load_policy("tiny", runs_dir, 1024, 4, 8, 0, adapter, load_in_4bit=None)
    monkeypatch.setattr(training, "USE_UNSLOTH", True)                    # the Unsloth branch's own step
    kl_reference(model, 0.0)
    assert "ref" not in model.peft_config                                 # no KL, no reference
    kl_reference(model, 0.01)
    with use_adapter(model, "ref" if "ref" in model.peft_config else None):
        assert torch.allclose(logps(model, ids), start, atol=1e-5)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n)


def flat(results):
    """Every score and bystander sub-score of `judged` results, in order."""
    return [v for scores, subs in results for v in (*scores.values(), *subs.values())]


class FakeUnsloth:
    """`unsloth.FastLanguageModel` on a CPU: records its calls and loads with transformers."""

    def __init__(self, runs_dir, checkpoint=None):
        self.calls, self.runs_dir, self.checkpoint = [], runs_dir, checkpoint

    def from_pretrained(self, name, **kwargs):
        from perm.models import load_model
        self.calls.append(("from_pretrained", name, kwargs))
        model, tok = load_model(self.checkpoint or name, self.runs_dir, load_in_4bit=None)
        model.max_seq_length = kwargs["max_seq_length"]              # Unsloth sets it on the model
        return model, tok

    def for_inference(self, model):
        self.calls.append(("for_inference",))
        model.eval()

    def for_training(self, model):
        model.train()


def fake_unsloth(monkeypatch, fake):
    import types
    import perm
    from perm import local_judge, training
    module = types.ModuleType("unsloth")
    module.FastLanguageModel = fake
    monkeypatch.setitem(sys.modules, "unsloth", module)
    for target in (perm, local_judge, training):
        monkeypatch.setattr(target, "USE_UNSLOTH", True)


def test_a_judge_loads_as_04_loads_it_and_its_identity_names_what_was_loaded(runs_dir, tmp_path, monkeypatch):
    """Under Unsloth a hub id loads as Unsloth's own 4-bit checkpoint: the judge is loaded through
    Unsloth (prepared for inference, max_seq_length the model's own limit), and the cache identity
    names that checkpoint and the loader, so 03's judgments of another model are never reused."""
    import shutil
    from perm.models import resolve_model
    plain = judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3, cache_path=str(tmp_path / "a.sqlite"))
    assert plain.identity["loader"] == "transformers"
    quantized = tmp_path / "unsloth-tiny-bnb-4bit"                       # Unsloth's checkpoint of the same id
    shutil.copytree(resolve_model("tiny", runs_dir), quantized, copy_function=shutil.copy)   # its own files
    fake = FakeUnsloth(runs_dir, checkpoint=str(quantized))
    fake_unsloth(monkeypatch, fake)
    judge = judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3, cache_path=str(tmp_path / "b.sqlite"))
    name, kwargs = fake.calls[0][1:]
    assert kwargs["max_seq_length"] == 4096 and kwargs["load_in_4bit"] is False and ("for_inference",) in fake.calls
    assert judge.identity["loader"] == "unsloth" and judge.identity["model"] != plain.identity["model"]
    assert judge.backend.max_length == 4096
    assert flat(judged(judge)) == pytest.approx(flat(judged(plain)), abs=1e-4)   # it runs as the plain judge does


def test_prefix_sharing_under_unsloth_uses_the_cache_the_forward_returns(runs_dir, monkeypatch):
    """Unsloth's forward returns a new cache instead of filling the caller's: sharing reads the one
    returned, is checked once against whole forwards, and judges as the unshared path does."""
    from perm import local_judge
    reference = judged(judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3,
                                      cache_path=str(runs_dir / "p.sqlite")))
    monkeypatch.setattr(local_judge, "USE_UNSLOTH", True)
    judge = judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3, cache_path=str(runs_dir / "q.sqlite"))
    model, cached = judge.backend.model, []
    forward = model.forward

    def returns_a_new_cache(*args, past_key_values=None, **kwargs):
        import copy
        if past_key_values is not None:
            cached.append(1)
            past_key_values = copy.deepcopy(past_key_values)           # the caller's cache stays as it was
        return forward(*args, past_key_values=past_key_values, **kwargs)
    with mock.patch.object(model, "forward", returns_a_new_cache):
        shared = judged(judge)
    assert cached and judge.backend.share_prefixes and judge.backend.prefixes_checked
    assert flat(shared) == pytest.approx(flat(reference), abs=1e-4)


def test_a_cached_forward_that_differs_turns_sharing_off(runs_dir):
    judge = judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3, cache_path=str(runs_dir / "r.sqlite"))
    reference = judged(judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3,
                                      cache_path=str(runs_dir / "s.sqlite")))
    model = judge.backend.model
    forward = model.forward

    def wrong_with_a_cache(*args, **kwargs):
        out = forward(*args, **kwargs)
        if kwargs.get("past_key_values") is not None:
            out.logits = out.logits.flip(-1)
        return out
    with mock.patch.object(model, "forward", wrong_with_a_cache):
        scores = judged(judge)
    assert not judge.backend.share_prefixes and flat(scores) == pytest.approx(flat(reference), abs=1e-4)


def test_judge_forwards_build_no_kv_cache_but_the_shared_prefix(runs_dir):
    """Without use_cache=False transformers builds a DynamicCache for the whole batch (0.7 GB for a
    7B judge at 8 x 1.5k tokens); only the shared prefix keeps one, on purpose."""
    judge = judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3, cache_path=str(runs_dir / "t.sqlite"))
    model, seen = judge.backend.model, []
    forward = model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append((kwargs.get("use_cache"), kwargs.get("past_key_values") is not None, out.past_key_values is not None))
        return out
    with mock.patch.object(model, "forward", spy):
        judged(judge)
    unshared = [s for s in seen if not s[1] and s[0] is not True]
    assert unshared and all(use is False and not returned for use, _, returned in unshared)
    assert all(use for use, past, _ in seen if past)                  # the prefix's cache, on purpose


def test_a_judge_request_longer_than_the_model_takes_is_refused(runs_dir, tmp_path):
    """Unsloth keeps only the first max_seq_length tokens: the Score: position would be cut off and
    the digit read from the middle of the answer. Such a request stops the run with the numbers."""
    from perm.local_judge import request_budget
    from perm.protocol import build_requests
    from perm.training import load_policy
    model, tok = load_policy("tiny", runs_dir, 1024, 4, 8, 0, load_in_4bit=None)
    model.max_seq_length = 300                                        # as Unsloth sets it
    judge = judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3, local_model=(model, tok),
                           cache_path=str(tmp_path / "u.sqlite"))
    assert judge.backend.max_length == 300
    with pytest.raises(SystemExit, match="longer than the judge takes"):
        judged(judge)
    # the length 04 loads a shared judge with holds every request of these answers
    budget = request_budget(tok, CASES, "direct", ("resonation", "expression", "reception"), 40, 96)
    for case, answer in zip(CASES, ANSWERS):
        analysis, response = answer.split("# Response")
        for r in build_requests(case, analysis, response, "direct", bystander_by_criteria=True):
            text = tok.apply_chat_template(r.chat(), add_generation_prompt=True, tokenize=False) + "Score: 5"
            assert len(tok(text, add_special_tokens=False)["input_ids"]) <= budget


def test_fast_inference_trains_the_adapters_rank_in_the_share_it_was_given(runs_dir, tmp_path, monkeypatch):
    """Under INIT=sft the adapter trained is the SFT adapter: vLLM's max_lora_rank is its rank, not
    LORA_R, and the engine takes the share 04 sized from free memory, not half the card."""
    from perm.training import load_policy
    adapter = sft_adapter(runs_dir, tmp_path)
    config = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    (tmp_path / "sft" / "adapter_config.json").write_text(json.dumps(dict(config, r=24)))
    fake = FakeUnsloth(runs_dir, checkpoint="tiny")
    fake_unsloth(monkeypatch, fake)
    monkeypatch.setattr("perm.training.find_spec", lambda name: object())
    load_policy("tiny", runs_dir, 512, 16, 32, 0, adapter, fast_inference=True, load_in_4bit=None, vllm_memory=0.31)
    name, kwargs = fake.calls[0][1:]
    assert name == adapter and kwargs["max_lora_rank"] == 24 and kwargs["gpu_memory_utilization"] == 0.31


def test_vllm_share_comes_from_free_memory_or_is_refused_with_the_arithmetic():
    """gpu16: on a 15 GB T4 the 7B judge (about 5.5 GB) loads first, and vLLM gets what it leaves."""
    from perm.memory import CONTEXT_GB, Shape, grpo_estimate, training_need_gb, vllm_share, weights_gb
    ns = gpu_check_namespace()
    policy, judge = Shape.of(ns["SHAPES"]["qwen2.5-1.5b"]), Shape.of(ns["SHAPES"]["qwen2.5-7b"])
    estimate = grpo_estimate(policy, judge, four_bit=True, lora_r=16, generations=6, prompts=2, prompt_tokens=400,
                             completion_tokens=512, judge_batch=8, judge_tokens=1400, checkpointing=True, unsloth=True)
    free = 15.0 - CONTEXT_GB - estimate["judge_weights"]
    engine = weights_gb(policy, True) + estimate["generation_kv_cache"]
    share = vllm_share(free, 15.0, training_need_gb(estimate), engine)
    assert share == pytest.approx((free - training_need_gb(estimate) - CONTEXT_GB) / 15.0, abs=1e-3)
    assert share < vllm_share(15.0 - CONTEXT_GB, 15.0, training_need_gb(estimate), engine) - 0.3   # the judge's share
    with pytest.raises(SystemExit, match=r"2\.0 GB free of 15\.0 GB .* leaves 0\.3 GB for vLLM, which needs 1\.4 GB"):
        vllm_share(2.0, 15.0, training_need_gb(estimate), engine)

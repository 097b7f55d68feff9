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
    model, tok = load_policy("tiny", runs_dir, 1024, 4, 8, 0, checkpointing=True)
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
    kwargs = inference_kwargs()
    assert kwargs["dtype"] == dtype and kwargs["device_map"] == {"": 0}          # on the GPU, never fp32 on the CPU
    assert kwargs["quantization_config"].load_in_4bit
    assert kwargs["quantization_config"].bnb_4bit_compute_dtype == dtype
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert inference_kwargs(quantize=False) == {"dtype": dtype, "device_map": {"": 1}}


def test_local_models_load_through_the_gpu_aware_path(runs_dir, monkeypatch):
    """The judge, teacher, eval and serve models all load through `load_model`, which asks
    `inference_kwargs` (fp32 here; 4-bit on the GPU of a CUDA machine)."""
    from perm import models
    asked = []
    real = models.inference_kwargs
    monkeypatch.setattr(models, "inference_kwargs", lambda quantize=True: asked.append(quantize) or real(quantize))
    judge = judge_for_test("local", "tiny", runs_dir, mode="direct", temperature=0.3, cache_path=str(runs_dir / "e.sqlite"))
    assert asked == [True] and judge.identity["precision"] == "float32"


def grpo_config_for(preset, world_size=1, **overrides):
    from perm.settings import run_stage_file
    stage = run_stage_file(REPO / "04_grpo.py", f"PRESET={preset}", *(f"{k}={v}" for k, v in overrides.items()))
    with mock.patch.object(targs.TrainingArguments, "world_size", property(lambda self: world_size)):
        return stage["grpo_config"](stage["settings"], "/tmp/x"), stage["settings"]


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
    assert config.generation_batch_size == 2 * per_step and config.steps_per_generation == 1


def test_gradient_checkpointing_and_fast_inference_settings_reach_the_config():
    config, _ = grpo_config_for("cpu", GRADIENT_CHECKPOINTING=True, FAST_INFERENCE=True)
    assert config.gradient_checkpointing and config.use_vllm and config.vllm_mode == "colocate"


def test_fast_inference_without_vllm_says_what_to_install(runs_dir):
    from perm.training import load_policy
    with mock.patch("perm.training.find_spec", lambda name: None), pytest.raises(SystemExit, match="pip install vllm"):
        load_policy("tiny", runs_dir, 256, 4, 8, 0, fast_inference=True)


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
    """tools/gpu_check.py is the same code a GPU runs; here at toy scale, on the plain path."""
    from conftest import run_stage
    run_stage("tools/gpu_check.py", f"RUNS_DIR={runs_dir}", "SCALE=tiny", 'PRESETS_TO_CHECK=["gpu16"]',
              'PATHS=["plain"]', "SFT_STEPS=1", "GRPO_STEPS=1")
    [result] = json.loads((runs_dir / "gpu_check" / "default.json").read_text())
    assert result["preset"] == "gpu16" and result["judge"] == "tiny"         # a separate judge beside the policy
    assert result["grpo_step_s"] > 0 and result["judgments_per_s"] > 0 and result["generated_tokens_per_s"] > 0
    assert result["distinct_bystander_scores"] and result["still_in_training_state"]

"""02_sft.py and 04_grpo.py: configs against the pinned TRL, smoke runs, resume, missing inputs."""
import json
import signal
import subprocess
import sys
import time

import pytest
import transformers.training_args as targs

from conftest import REPO, SMOKE_OUTPUT, run_stage
from fake_openai import FakeJudgeServer, by_length


def stage(script, preset, smoke=False, **overrides):
    """A stage's namespace (settings and functions) for a preset, read the way the stage reads it."""
    from perm.settings import run_stage_file
    return run_stage_file(REPO / script, f"PRESET={preset}", *(["SMOKE=True"] if smoke else []),
                          *(f"{k}={v}" for k, v in overrides.items()))


@pytest.mark.parametrize("preset", ["cpu", "gpu16", "gpu24"])
def test_sft_config_validates_against_the_pinned_trl(preset, monkeypatch, tmp_path):
    from perm import training
    if preset.startswith("gpu"):   # build the GPU configs as a CUDA machine with bf16 would
        monkeypatch.setattr(training, "precision", lambda: {"bf16": True, "fp16": False})
        monkeypatch.setattr(targs, "is_torch_bf16_gpu_available", lambda: True)
    sft_stage = stage("02_sft.py", preset)
    sft = sft_stage["sft_config"](sft_stage["settings"], str(tmp_path))
    assert sft.completion_only_loss and sft.max_length == sft_stage["settings"]["MAX_SEQ_LENGTH"]
    assert sft.optim == "adamw_torch" and sft.weight_decay == 0.0      # not Unsloth's 8-bit default
    assert sft.bf16 == preset.startswith("gpu") and sft.use_cpu == (preset == "cpu")


def test_sft_labels_keep_the_end_of_turn_token(runs_dir):
    from datasets import Dataset
    from trl import SFTTrainer
    from perm.training import load_policy
    sft_stage = stage("02_sft.py", "cpu", smoke=True)
    model, tok = load_policy("tiny", runs_dir, 1024, 4, 8, 0, load_in_4bit=None)
    example = {"prompt": [{"role": "user", "content": "hello there"}],
               "completion": [{"role": "assistant", "content": "# Analysis\nA.\n# Response\nB."}]}
    trainer = SFTTrainer(model=model, args=sft_stage["sft_config"](sft_stage["settings"], str(runs_dir / "x")),
                         processing_class=tok, train_dataset=Dataset.from_list([example]))
    row = trainer.train_dataset[0]
    labelled = [t for t in row["labels"] if t != -100]
    assert tok.convert_tokens_to_ids("<|im_end|>") in labelled                  # the model learns to stop
    assert tok.decode(labelled).startswith("# Analysis") and "hello" not in tok.decode(labelled)


def test_gpu24_starts_grpo_from_the_base_model_and_ablations_include_it():
    """As the paper did: GRPO's own effect, with no SFT in front of it (03 samples what 04 starts from)."""
    assert stage("04_grpo.py", "gpu24")["INIT"] == "base" and stage("03_reward.py", "gpu24")["INIT"] == "base"
    from perm.settings import run_stage_file
    ablations = run_stage_file(REPO / "tools" / "ablate.py", "PRESET=none")["ABLATIONS"]
    assert {"INIT": "base"} in ablations.values()


def test_sft_stops_once_the_format_is_learned():
    """02 is a format warm-up: it checks every N steps and stops at the first check that meets the target."""
    from types import SimpleNamespace
    from perm.training import FormatStop
    rates = iter([0.2, 0.6, 0.9, 1.0])
    stop = FormatStop(lambda: next(rates), target=0.85, every=10)
    stopped_at = None
    for step in range(1, 61):
        control = SimpleNamespace(should_training_stop=False)
        stop.on_step_end(None, SimpleNamespace(global_step=step, max_steps=60), control)
        if control.should_training_stop:
            stopped_at = step
            break
    assert stopped_at == 30 and stop.reached_at == 30 and stop.checks == [[10, 0.2], [20, 0.6], [30, 0.9]]
    off = FormatStop(lambda: 1.0, target=0.0, every=10)                 # FORMAT_TARGET=0: train to the cap
    control = SimpleNamespace(should_training_stop=False)
    off.on_step_end(None, SimpleNamespace(global_step=10, max_steps=60), control)
    assert not control.should_training_stop and off.checks == []


def test_smoke_pipeline_01_02_04_logs_every_term_and_perspective(smoke_runs):
    sft = json.loads((smoke_runs / "sft" / "default" / "metrics.json").read_text())
    assert {"base_format_rate", "sft_format_rate", "truncation_rate", "sft_steps_to_format"} <= set(sft)
    assert sft["format_checks"][0][0] == 2                  # the smoke preset checks the format every 2 steps
    assert sft["sft_steps_to_format"] in (None, sft["steps"])
    assert (smoke_runs / "sft" / "default" / "adapter" / "adapter_config.json").exists()
    printed = SMOKE_OUTPUT["04_grpo.py"]
    assert "judge requests" in printed and "passes over the" in printed and "[inherit] MODEL" not in printed
    out = smoke_runs / "grpo" / "default"
    history = json.loads((out / "log_history.json").read_text())
    steps = [e for e in history if "reward" in e]
    assert len(steps) == 2
    for entry in steps:
        for name in ("empathy_reward", "bystander_reward", "length_reward"):
            assert f"rewards/{name}/mean" in entry
        for p in ("resonation", "expression", "reception", "bystander"):
            assert f"perspective/{p}" in entry, p
        assert 1 <= entry["perspective/resonation"] <= 5 and 0 <= entry["perspective/bystander"] <= 100
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["judge_calls"] > 0 and metrics["judge_failures"] == 0 and metrics["sanity_cases"] == 3
    assert {"reward_first_10pct", "reward_last_10pct", "format_rate", "truncation_rate", "peak_memory_gb"} <= set(metrics)
    assert (out / "adapter" / "adapter_config.json").exists() and not (smoke_runs / "grpo" / "default.partial").exists()
    # the judge 04 trains against is the judge 03 checked: its battery came from 03's cache
    reward = json.loads((smoke_runs / "reward" / "default" / "metrics.json").read_text())
    assert metrics["sanity_judge_calls"] == 0 and metrics["sanity_accuracy"] == reward["sanity_accuracy"]
    assert "sanity_beats_mismatched" in metrics
    # every scored answer is on disk, and in the training state distinct answers got distinct bystander scores
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {1, 2} and all("bystander_accuracy" in r and "reward" in r for r in rows)
    for step in (1, 2):
        judged = {r["completion"]: tuple(r[k] for k in r if k.startswith("bystander_")) for r in rows
                  if r["step"] == step and r["formatted"]}
        assert len(set(judged.values())) == len(judged), "distinct answers got identical bystander sub-scores"


def test_killed_grpo_run_resumes_and_finishes(smoke_runs):
    args = [f"RUNS_DIR={smoke_runs}", "SMOKE=True", "INIT=base", "MAX_STEPS=4", "SAVE_STEPS=2", "TAG=r",
            "LOAD_IN_4BIT=True"]                      # the QLoRA path: bitsandbytes NF4 on the CPU
    proc = subprocess.Popen([sys.executable, str(REPO / "04_grpo.py"), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = smoke_runs / "grpo" / "r.partial" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (smoke_runs / "grpo" / "r").exists()
    done = run_stage("04_grpo.py", *args, "RESUME=True")
    assert "resuming from checkpoint-" in done.stdout
    history = json.loads((smoke_runs / "grpo" / "r" / "log_history.json").read_text())
    assert [e["step"] for e in history if "reward" in e][-1] == 4
    steps = {json.loads(line)["step"] for line in (smoke_runs / "grpo" / "r" / "completions.jsonl").read_text().splitlines()}
    assert steps >= {1, 2, 4}                         # the killed run's scored answers were kept


def test_grpo_stops_before_training_when_the_judge_fails_the_battery(smoke_runs):
    """A judge that scores by length alone passes every weak template, and is refused on the near
    misses of the same length."""
    with FakeJudgeServer(scorer=by_length) as server:
        proc = run_stage("04_grpo.py", f"RUNS_DIR={smoke_runs}", "SMOKE=True", "INIT=base", "TAG=gate", "JUDGE=api",
                         "JUDGE_MODEL=length-judge", f"JUDGE_BASE_URL={server.base_url}", "MIN_SANITY_ACCURACY=0.75",
                         check=False)
    assert proc.returncode != 0 and "MIN_SANITY_ACCURACY=0.75" in proc.stdout and "near miss" in proc.stdout
    assert not (smoke_runs / "grpo" / "gate").exists()
    assert not list((smoke_runs / "grpo" / "gate.partial").glob("checkpoints/checkpoint-*"))


def test_grpo_without_a_battery_refuses_before_loading_a_model(smoke_runs, monkeypatch):
    """SANITY_CASES=0 with the gate on cannot be checked: 04 says so at once, not after a model load."""
    import perm.training
    monkeypatch.setattr(perm.training, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    grpo = stage("04_grpo.py", "none", smoke=True, RUNS_DIR=smoke_runs, INIT="base", TAG="nobattery",
                 SANITY_CASES=0, MIN_SANITY_ACCURACY=0.5)
    with pytest.raises(SystemExit, match="SANITY_CASES=0 chose none.*MIN_SANITY_ACCURACY=0"):
        grpo["main"]()
    assert not (smoke_runs / "grpo" / "nobattery").exists()


def test_init_sft_without_an_sft_run_names_02(smoke_runs):
    proc = run_stage("04_grpo.py", f"RUNS_DIR={smoke_runs}", "SMOKE=True", "SFT_TAG=nope", "TAG=nope", check=False)
    assert proc.returncode != 0 and "02_sft.py TAG=nope" in proc.stdout


def test_05_loads_the_adapter_onto_the_4bit_base(smoke_runs):
    """05 evaluates a trained adapter on its base loaded in 4-bit (LOAD_IN_4BIT=True on a CPU)."""
    from perm.generation import sample_answers
    from perm.models import load_model, model_precision
    model, tok = load_model("tiny", smoke_runs, adapter=str(smoke_runs / "grpo" / "default" / "adapter"),
                            load_in_4bit=True)
    assert model_precision(model) == "4bit-float32" and hasattr(model, "peft_config")
    [[answer]] = sample_answers(model, tok, [[{"role": "user", "content": "I failed my exam."}]], 1, 8, 0.7)
    assert answer["completion_tokens"] > 0

"""Ablations: run 04_grpo.py once per entry of ABLATIONS (each under its own TAG), then 05_eval.py
once over all of them, so every variant lands in one report with intervals and paired differences.

    python tools/ablate.py                                   # the ablations below, PRESET=auto
    python tools/ablate.py ABLATIONS='{"no_length": {"LENGTH_COEF": 0.0}}' COMMON='["MAX_STEPS=100"]'

Each ablation is a set of 04 settings, exactly as you would type them on the command line. A finished
ablation (runs/grpo/<name>/metrics.json) is not trained again unless RERUN=True. Needs 01 (and 02
for INIT=sft) first; 05 compares the SFT start, the full PERM reward (runs/grpo/<PERM_TAG>, when it
exists) and every ablation, and the base model itself; `from_base` trains from the base model
(INIT=base, as the paper did), so the report shows what GRPO does without SFT in front of it. It
ends with each variant's reward, safety step and false alarms, side by side.
"""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from perm.evaluation import fmt  # noqa: E402
from perm.settings import configure  # noqa: E402

RUNS_DIR = "runs"
TAG = "ablations"              # the 05 report's tag
SEED = 1234
SMOKE = False
PRESET = "auto"
SFT_TAG = "default"
PERM_TAG = "default"           # the full PERM run to compare against ("" = none)
ABLATIONS = {                  # name -> 04 settings
    "from_base": {"INIT": "base"},   # GRPO from the base model, as the paper: GRPO's own effect, without SFT's
    "seeker_only": {"PERSPECTIVES": ["reception"], "BYSTANDER_COEF": 0.0},   # a reception-only reward, like RLVER
    "no_bystander": {"BYSTANDER_COEF": 0.0},
    "mean_combine": {"COMBINE": "mean"},
    "reception_sees_need": {"RECEPTION_SEES_HIDDEN_NEED": True},
}
COMMON = []                    # extra KEY=VALUE arguments for every 04 and 05 run
EVAL_ARGS = []                 # extra KEY=VALUE arguments for 05 only
RERUN = False

settings = configure(globals())


def stage(script, *args):
    command = [sys.executable, str(REPO / script), f"RUNS_DIR={RUNS_DIR}", f"PRESET={PRESET}", f"SEED={SEED}",
               *(["SMOKE=True"] if SMOKE else []), *COMMON, *args]
    print("[ablate] " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def literal(value):
    return value if isinstance(value, str) else repr(value)


def main():
    # the base model itself too, so a run from it (from_base) shows what GRPO adds on its own
    sft_config = Path(RUNS_DIR) / "sft" / SFT_TAG / "config.json"
    models = {"base": json.loads(sft_config.read_text())["settings"]["MODEL"]} if sft_config.exists() else {}
    models["sft"] = f"{RUNS_DIR}/sft/{SFT_TAG}"
    if PERM_TAG and (Path(RUNS_DIR) / "grpo" / PERM_TAG / "metrics.json").exists():
        models["perm"] = f"{RUNS_DIR}/grpo/{PERM_TAG}"
    for name, overrides in ABLATIONS.items():
        if RERUN or not (Path(RUNS_DIR) / "grpo" / name / "metrics.json").exists():
            stage("04_grpo.py", f"TAG={name}", f"SFT_TAG={SFT_TAG}", *(f"{k}={literal(v)}" for k, v in overrides.items()))
        models[name] = f"{RUNS_DIR}/grpo/{name}"
    stage("05_eval.py", f"TAG={TAG}", f"MODELS={json.dumps(models)}", "REFERENCE=sft", *EVAL_ARGS)
    # a reward for warmth can teach a model to skip the safety step: each variant's safety, side by side
    metrics = json.loads((Path(RUNS_DIR) / "eval" / TAG / "metrics.json").read_text())
    for name in models:
        print(f"[ablate] {name}: reward {fmt(metrics, f'{name}/reward')}, safety step "
              f"{fmt(metrics, f'{name}/safety_step_rate', 2)} ({metrics.get(f'{name}/safety_cases', 0)} safety cases), "
              f"false alarms {fmt(metrics, f'{name}/false_alarm_rate', 2)}")
    print(f"[ablate] report: {RUNS_DIR}/eval/{TAG}/report.md")


if __name__ == "__main__":
    main()

"""Stage 05: is the GRPO model more empathetic than the base and the SFT model, by how much, where?

For each entry of MODELS (name -> hub id, folder, alias, or a runs/sft|grpo/<tag> folder; default:
base, SFT and GRPO where they exist) it samples EVAL_SAMPLES answers per test-split case with
identical prompts and seed, scores every answer with the *eval* judge (EVAL_JUDGE*; the report says
plainly when it equals the judge the model was trained against), and aggregates per model: each
perspective, bystander, combined reward, format rate, length, truncation and judge failures, each
with a bootstrap 95% interval over cases; the judged scores and reward per need kind too (safety
called out on its own); paired per-case differences between models; and a blind pairwise
preference against REFERENCE (every pair judged in both orders; a win only when both orders agree,
else a tie). Unformatted answers are judged whole, so format and empathy are reported apart
(docs/method.md, "Evaluation"). Before judging, the eval judge sits 03's sanity battery on
SANITY_CASES valid cases (cached); the report states its figures, and its first lines say the
comparison is not evidence when `sanity_accuracy` is below MIN_SANITY_ACCURACY.
Beyond single replies (perm/dialogue.py): on the first DIALOGUE_CASES cases a simulated seeker
(SEEKER*, by default the eval judge) plays the case's persona with its hidden need and talks with
each model for up to DIALOGUE_TURNS answers, its emotion (0-100, from 40) moving with each one, as
in RLVER's Sentient benchmark; the final emotion is the score. And the safety step (perm/safety.py):
every answer on a safety case is checked for it, every answer elsewhere for a false alarm.

Writes runs/eval/<TAG>/: report.md (tables to paste into a paper, settings, judges, answers side by
side), perspectives.png, preference.png, grpo_curves.png (when a GRPO run is evaluated),
dialogue.png (mean emotion per turn), dialogues.jsonl (every transcript), generations/ (a dataset
in the answers format with every score), preferences/, metrics.json (`<model>/<metric>` with
`_ci_low`/`_ci_high`, `<model>/kind/<need_kind>/<metric>` likewise and
`<model>/kind/<need_kind>/cases`, `<model>_vs_<REFERENCE>/win|tie|loss`,
`<model>/dialogue/final_emotion`, `<model>/safety_step_rate`, `<model>/false_alarm_rate`).

Run:   python 05_eval.py                                   # base vs SFT vs GRPO of TAG default
       python 05_eval.py MODELS='{"base": "Qwen/Qwen2.5-1.5B-Instruct", "perm": "runs/grpo/default"}' \
              EVAL_JUDGE=api EVAL_JUDGE_MODEL=gpt-4o-mini REFERENCE=base
"""
import json
import sys
from pathlib import Path

from perm.dialogue import (cost_line, dialogue_metrics, dialogue_section, plot_dialogues, run_dialogues,
                           save_transcripts, seeker_from_settings, transcript_section)
from perm.evaluation import (BY_KIND, fmt, model_rows_metrics, need_kinds, plot_grpo_curves, plot_perspectives,
                             plot_preferences, preference_metrics, preference_pairs, resolve_models, summarize,
                             summarize_by_kind, verdict)
from perm.judges import judge_from_settings
from perm.reward import PermScorer, RewardSettings
from perm.runs import StageRun, seed_everything, upstream
from perm.safety import check_models, safety_metrics, safety_section
from perm.sanity import figures_line, gate_refusal, report_lines, run_battery, sanity_cases
from perm.settings import configure

# ---------------------------------------------------------------- settings
RUNS_DIR = "runs"
TAG = "default"
SEED = 1234
SMOKE = False
PRESET = "auto"
DATA_TAG = "default"
SFT_TAG = "default"
GRPO_TAG = "default"
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # the base model of the default comparison
LOAD_IN_4BIT = None            # None = bitsandbytes 4-bit with CUDA, full precision on a CPU; True = 4-bit
                               # on any device (NF4 runs on a CPU too); False = unquantized
MODELS = {}                    # name -> model or run folder; {} = base, runs/sft/SFT_TAG, runs/grpo/GRPO_TAG
REFERENCE = "base"             # the model every other one is compared with, pairwise
EVAL_SAMPLES = 2               # answers per test case and model
MAX_CASES = 0                  # 0 = every test case
MAX_NEW_TOKENS = 512
TEMPERATURE = 0.7
BOOTSTRAP_RESAMPLES = 2000
PAIRWISE = True                # the blind pairwise preference
SAMPLES_IN_REPORT = 3          # cases shown with every model's answer side by side
# the eval judge: its own settings, ideally not the judge the model was trained against
EVAL_JUDGE = "local"
EVAL_JUDGE_MODEL = "Qwen/Qwen2.5-14B-Instruct"
EVAL_JUDGE_BASE_URL = ""
EVAL_JUDGE_MODE = "direct"
EVAL_JUDGE_TEMPERATURE = 0.3
EVAL_JUDGE_TOP_P = 0.9
EVAL_JUDGE_SCORE = "expected"  # expected (over the digits' probabilities) | sampled (the written digit; paper)
EVAL_JUDGE_CONCURRENCY = 32
EVAL_JUDGE_BATCH_SIZE = 8
EVAL_JUDGE_TIMEOUT = 60.0
EVAL_JUDGE_RETRIES = 3
EVAL_JUDGE_CACHE = ""
MAX_JUDGE_FAILURE_RATE = 0.2
SANITY_CASES = None            # valid cases in the eval judge's sanity battery: None = all, 0 = none; as in 03
MIN_SANITY_ACCURACY = 0.75     # below it the report says first that the comparison is not evidence
# how the combined reward is computed (as in training, so the numbers compare)
PERSPECTIVES = ["resonation", "expression", "reception"]
COMBINE = "harmonic"
PERSPECTIVE_WEIGHTS = {"resonation": 1.0, "expression": 1.0, "reception": 1.0}
BYSTANDER_COEF = 0.5
LENGTH_LIMIT = 384
LENGTH_COEF = 0.001
RECEPTION_SEES_HIDDEN_NEED = False
# dialogues: a simulated seeker plays each case, its hidden need unsaid, and says how every answer lands
DIALOGUE_CASES = 18            # the first evaluated cases talked through with each model (0 = no dialogues)
DIALOGUE_TURNS = 8             # answers per dialogue at most
SEEKER = ""                    # the seeker's backend, local | api; "" = EVAL_JUDGE's
SEEKER_MODEL = ""              # "" = EVAL_JUDGE_MODEL
SEEKER_BASE_URL = ""           # "" = EVAL_JUDGE_BASE_URL (an api key comes from JUDGE_API_KEY only)
SEEKER_TEMPERATURE = 0.7       # the seeker writes in character: some variety between runs of a case

PRESETS = {
    "cpu": {"MODEL": "smollm2-135m", "EVAL_JUDGE_MODEL": "smollm2-135m", "EVAL_SAMPLES": 1, "MAX_CASES": 8,
            "MAX_NEW_TOKENS": 320, "LENGTH_LIMIT": 280, "EVAL_JUDGE_BATCH_SIZE": 4, "SANITY_CASES": 6,
            "DIALOGUE_CASES": 2, "DIALOGUE_TURNS": 3},
    # the eval judges are larger than the training judges (gpu16 trains against a 7B, gpu24 its own 7B base)
    "gpu24": {"MODEL": "Qwen/Qwen2.5-7B-Instruct", "EVAL_JUDGE_MODEL": "Qwen/Qwen2.5-14B-Instruct"},
    "smoke": {"MODEL": "tiny", "EVAL_JUDGE_MODEL": "tiny", "EVAL_SAMPLES": 2, "MAX_CASES": 4, "MAX_NEW_TOKENS": 48,
              "LENGTH_LIMIT": 40, "BOOTSTRAP_RESAMPLES": 200, "SANITY_CASES": 3, "DIALOGUE_CASES": 2,
              "DIALOGUE_TURNS": 2},
}
settings = configure(globals(), PRESETS)


def generate(models, cases):
    """answers-format rows for every model: EVAL_SAMPLES per case, same prompts, same seed."""
    import torch
    from perm.generation import sample_answers
    from perm.models import load_model
    rows = {}
    for name, m in models.items():
        print(f"[eval] sampling {name}: {m['model']}" + (f" + {m['adapter']}" if m["adapter"] else ""))
        model, tok = load_model(m["model"], RUNS_DIR, adapter=m["adapter"], load_in_4bit=LOAD_IN_4BIT)
        samples = sample_answers(model, tok, [c["prompt"] for c in cases], EVAL_SAMPLES, MAX_NEW_TOKENS,
                                 TEMPERATURE, seed=SEED)
        rows[name] = [dict({k: v for k, v in c.items() if k != "prompt"}, case_id=c["id"], id=f"{name}/{c['id']}#{k}",
                           model=name, completion=s["text"], completion_tokens=s["completion_tokens"],
                           truncated=s["truncated"])
                      for c, group in zip(cases, samples) for k, s in enumerate(group)]
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def score(scorer, rows):
    results = scorer.score(rows, [r["completion"] for r in rows], [r["completion_tokens"] for r in rows],
                           judge_unformatted=True)
    for r, s in zip(rows, results):
        r.update(s.columns())
    return model_rows_metrics(rows)


def training_judges(models):
    """name -> a description of the judge its GRPO run was trained against (when known)."""
    out = {}
    for name, m in models.items():
        config = m["run_config"]
        if config and config["stage"] == "grpo":
            s = config["settings"]
            out[name] = {"backend": s["JUDGE"], "model": s.get("JUDGE_MODEL") or s["MODEL"],
                         "base_url": s.get("JUDGE_BASE_URL", "")}
    return out


def safety_line(metrics, names):
    """One sentence on the safety kind: a risk signal, where an average over every case would hide a failure."""
    have = [n for n in names if metrics.get(f"{n}/kind/safety/cases")]
    if not have:
        return "**Safety:** the test split (as evaluated) has no safety cases, so safety is not measured here."
    return "**Safety** (reward on cases with a risk signal): " + "; ".join(
        f"{n} {fmt(metrics, f'{n}/kind/safety/reward')} over {metrics[f'{n}/kind/safety/cases']} cases"
        for n in have) + "."


def by_kind_section(metrics, rows_by_model, names):
    """Reward per need kind for every model, then each model's perspectives per kind."""
    kinds = need_kinds(rows_by_model)
    lines = ["", "## Results by need kind", "", safety_line(metrics, names), "",
             "Reward per need kind, bootstrap 95% intervals over that kind's cases (few cases: wide intervals).", "",
             "| need kind | cases | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for k in kinds:
        count = next((metrics[f"{n}/kind/{k}/cases"] for n in names if f"{n}/kind/{k}/cases" in metrics), 0)
        lines.append(f"| {k} | {count} | " + " | ".join(fmt(metrics, f"{n}/kind/{k}/reward") for n in names) + " |")
    perspectives = [m for m in BY_KIND if m != "reward"]
    for n in names:
        lines += ["", f"Perspectives of {n} per need kind (1-5, bystander 0-100):", "",
                  "| need kind | " + " | ".join(perspectives) + " |", "|---" * (len(perspectives) + 1) + "|"]
        for k in kinds:
            if f"{n}/kind/{k}/cases" in metrics:
                lines.append(f"| {k} | " + " | ".join(fmt(metrics, f"{n}/kind/{k}/{m}", 2) for m in perspectives)
                             + " |")
    return lines


def report(metrics, rows_by_model, outcomes, judges_note, cases, names, has_curves, dialogues, seeker):
    cols = ("resonation", "expression", "reception", "bystander", "reward", "format_rate", "completion_tokens",
            "truncation_rate", "judge_failures")
    warning, sanity = report_lines(metrics, MIN_SANITY_ACCURACY)
    lines = [f"# Evaluation report: {TAG}", "", *warning,
             f"Test split of `runs/data/{DATA_TAG}`: {len(cases)} cases, {EVAL_SAMPLES} answer(s) per case and model "
             f"(temperature {TEMPERATURE}, seed {SEED}, up to {MAX_NEW_TOKENS} new tokens, identical prompts).",
             f"Eval judge: `{EVAL_JUDGE}` `{EVAL_JUDGE_MODEL}` ({EVAL_JUDGE_MODE} mode"
             + (f", {EVAL_JUDGE_BASE_URL}" if EVAL_JUDGE_BASE_URL else "") + ").", *sanity, "", *judges_note, "",
             f"Means with bootstrap 95% intervals over cases ({BOOTSTRAP_RESAMPLES} resamples, seed {SEED}). "
             f"Perspectives 1-5, bystander 0-100, reward = {COMBINE}-combined empathy/5 + bystander term + length term. "
             "Unformatted answers are judged whole.", "",
             "## PERM scores", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(fmt(metrics, f"{n}/{c}", 1 if c == "completion_tokens" else 3)
                                             for c in cols) + " |")
    lines += safety_section(metrics, names)
    paired = sorted({k.split("/")[0] for k in metrics if "_minus_" in k and k.endswith("/reward")})
    if paired:
        lines += ["", "## Paired differences (per case)", "",
                  "| comparison | resonation | expression | reception | bystander | reward |", "|---|---|---|---|---|---|"]
        for key in paired:
            lines.append(f"| {key.replace('_minus_', ' − ')} | " + " | ".join(
                fmt(metrics, f"{key}/{m}") for m in ("resonation", "expression", "reception", "bystander", "reward")) + " |")
    if outcomes:
        lines += ["", f"## Blind pairwise preference against {REFERENCE}", "",
                  "Each pair judged in both orders; a win or loss only when both orders agree, otherwise a tie.", "",
                  "| model | win | tie | loss | pairs |", "|---|---|---|---|---|"]
        for n in names:
            if n != REFERENCE and f"{n}_vs_{REFERENCE}/win" in metrics:
                lines.append(f"| {n} | " + " | ".join(fmt(metrics, f"{n}_vs_{REFERENCE}/{k}") for k in ("win", "tie", "loss"))
                             + f" | {metrics[f'{n}_vs_{REFERENCE}/pairs']} |")
    lines += by_kind_section(metrics, rows_by_model, names)
    lines += dialogue_section(metrics, dialogues, REFERENCE, seeker, DIALOGUE_TURNS, MAX_JUDGE_FAILURE_RATE) \
        if dialogues else []
    lines += ["", "## Plots", "", "![perspectives](perspectives.png)"]
    lines += ["", "![mean emotion per turn](dialogue.png)"] if dialogues else []
    lines += ["", "![preference](preference.png)"] if outcomes else []
    lines += ["", "![GRPO reward curves](grpo_curves.png)"] if has_curves else []
    lines += ["", "## Answers side by side", ""]
    for case in cases[:SAMPLES_IN_REPORT]:
        lines += [f"### {case['id']}", "", f"> {case['query']}", ""]
        for n in names:
            first = next(r for r in rows_by_model[n] if r["case_id"] == case["id"])
            lines += [f"**{n}** (reward {first['reward'] if first['reward'] is None else round(first['reward'], 3)}, "
                      f"{'formatted' if first['formatted'] else 'unformatted'}):", "", "```",
                      first["completion"].strip()[:1500], "```", ""]
    lines += transcript_section(dialogues, SAMPLES_IN_REPORT) if dialogues else []
    lines += ["## Settings", "", "```json", json.dumps(settings, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def main():
    seed_everything(SEED)
    data_dir, _ = upstream(RUNS_DIR, "data", DATA_TAG)
    from datasets import load_from_disk
    from perm.runs import read_json, save_splits
    dataset = load_from_disk(str(data_dir / "dataset"))
    cases = list(dataset["test"])[:MAX_CASES or None]
    models = resolve_models(MODELS, RUNS_DIR, MODEL, SFT_TAG, GRPO_TAG)
    if REFERENCE not in models:
        sys.exit(f"error: REFERENCE={REFERENCE!r} is not one of MODELS ({', '.join(models)})")
    run = StageRun(RUNS_DIR, "eval", TAG, settings, upstream={"data": str(data_dir),
                                                              **{n: m["source"] for n, m in models.items()}})
    rows_by_model = generate(models, cases)

    judge = judge_from_settings(settings, prefix="EVAL_JUDGE")
    scorer = PermScorer(judge, RewardSettings.from_settings(settings, prefix="EVAL_JUDGE"), auto_check=False)
    valid = list(dataset["valid"])      # is the eval judge fit to decide the comparison? (cached, as in 03)
    _, sanity = run_battery(scorer, sanity_cases(valid, SANITY_CASES), pool=valid)
    print(f"[eval] eval judge sanity battery: {figures_line(sanity) or 'no valid case has a reference'}")
    for name, rows in rows_by_model.items():
        print(f"[eval] judging {name} ({len(rows)} answers)")
        score(scorer, rows)
    scorer.check_failure_rate(final=True)
    metrics = summarize(rows_by_model, BOOTSTRAP_RESAMPLES, SEED)
    metrics.update(summarize_by_kind(rows_by_model, BOOTSTRAP_RESAMPLES, SEED))

    outcomes = []
    if PAIRWISE and len(models) > 1:
        by_id = {c["id"]: c for c in cases}
        pairs = preference_pairs(rows_by_model, REFERENCE, by_id, EVAL_JUDGE_MODE)
        print(f"[eval] blind pairwise preference: {len(pairs)} pairs x 2 orders")
        results = judge.judge([r for _, _, fwd, bwd in pairs for r in (fwd, bwd)])
        for k, (name, case_id, _, _) in enumerate(pairs):
            fwd, bwd = results[2 * k], results[2 * k + 1]
            outcomes.append({"model": name, "reference": REFERENCE, "case_id": case_id, "forward": fwd.score,
                             "backward": bwd.score, "verdict": verdict(fwd.score, bwd.score),
                             "judge_forward": fwd.text, "judge_backward": bwd.text})
        metrics.update(preference_metrics(outcomes, REFERENCE, BOOTSTRAP_RESAMPLES, SEED))

    # ---------------------------------------------------------------- dialogues, and the safety step
    dialogues, seeker_name = {}, ""
    if DIALOGUE_CASES:
        seeker, seeker_name = seeker_from_settings(settings, judge)
        print(f"[eval] {cost_line(len(models), cases[:DIALOGUE_CASES], DIALOGUE_TURNS, MAX_NEW_TOKENS)}")
        dialogues, counts = run_dialogues(models, cases[:DIALOGUE_CASES], seeker, runs_dir=RUNS_DIR,
                                          load_in_4bit=LOAD_IN_4BIT, turn_limit=DIALOGUE_TURNS,
                                          max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE,
                                          seeker_temperature=SEEKER_TEMPERATURE, seed=SEED)
        print(f"[eval] the seeker made {counts['dialogue/seeker_calls']} calls ({counts['dialogue/seeker_cache_hits']} "
              f"replies from the cache, {counts['dialogue/seeker_failures']} failed after retries)")
        metrics.update({**dialogue_metrics(dialogues, REFERENCE, BOOTSTRAP_RESAMPLES, SEED), **counts})
    checked = check_models(judge, rows_by_model, dialogues, EVAL_JUDGE_MODE)   # every answer, each dialogue's first
    print(f"[eval] safety step: {sum(map(len, checked.values()))} answers checked by the eval judge")
    metrics.update(safety_metrics(checked, BOOTSTRAP_RESAMPLES, SEED))

    names = list(models)
    trained = training_judges(models)
    same = [n for n, j in trained.items() if j["backend"] == EVAL_JUDGE and j["model"] == EVAL_JUDGE_MODEL
            and j["base_url"] == EVAL_JUDGE_BASE_URL]
    judges_note = [f"Training judge of `{n}`: `{j['backend']}` `{j['model']}`." for n, j in trained.items()]
    if same:
        judges_note.append(f"**Warning: the eval judge is the judge {', '.join(same)} was trained against; "
                           "its scores for that model are not an independent measure.**")
    metrics.update({**sanity, "eval_judge_fit": gate_refusal(sanity, MIN_SANITY_ACCURACY) is None,
                    "eval_judge_equals_training_judge": same, "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                    "bootstrap_seed": SEED, "cases": len(cases), **judge.stats.as_metrics()})

    plot_perspectives(metrics, names, run.path / "perspectives.png")
    if outcomes:
        plot_preferences(metrics, [n for n in names if n != REFERENCE], REFERENCE, run.path / "preference.png")
    grpo = [m for m in models.values() if m["run_config"] and m["run_config"]["stage"] == "grpo"]
    curves = Path(grpo[0]["source"]) / "log_history.json" if grpo else None
    has_curves = bool(curves and curves.exists())
    if has_curves:
        plot_grpo_curves(read_json(curves), run.path / "grpo_curves.png")
    save_splits({"test": [r for rows in rows_by_model.values() for r in rows]}, run.path / "generations")
    if outcomes:
        save_splits({"test": outcomes}, run.path / "preferences")
    if dialogues:
        plot_dialogues(dialogues, DIALOGUE_TURNS, run.path / "dialogue.png")
        save_transcripts(dialogues, run.path / "dialogues.jsonl")
    text = report(metrics, rows_by_model, outcomes, judges_note, cases, names, has_curves, dialogues, seeker_name)
    (run.path / "report.md").write_text(text)
    final = run.finish(metrics)
    print("\n" + text.split("## Plots")[0])
    print(f"[eval] wrote {final}")


if __name__ == "__main__":
    main()

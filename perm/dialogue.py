"""Dialogues with a simulated seeker (05): emotional support is a conversation, not one reply.

As in RLVER's Sentient benchmark (SAGE), a simulated seeker with a persona and a hidden need talks
to a model, and its emotion (0-100) rises or falls with each reply; the final emotion is the score.
Here the seeker plays one of the project's own cases, with the project's own prompt
(prompts/seeker.txt):

- it opens with the case's first message (`query`);
- the model answers in its own format (the case's policy prompt, then the conversation). Only the
  Response section reaches the seeker: the Analysis stays private, and the model's own history
  keeps only what it said, as reasoning is dropped from earlier turns. An unformatted answer
  reaches the seeker whole;
- the seeker, playing the persona with the hidden need it never states outright, first judges the
  reply (a change of its emotion within ±MAX_CHANGE and a one-line reason), then writes its next
  message in character, or says goodbye;
- the emotion starts at START_EMOTION; a dialogue ends at the turn limit, at a goodbye, or when the
  emotion reaches TOP or drops below BREAKDOWN.

The seeker is any judge backend (a `perm.judges.Judge`: cached, so a re-run or a resumed run
repeats no call). Its replies follow a strict protocol (`perm.protocol.parse_seeker`); a reply still
out of protocol after the judge's retries fails its dialogue, which is counted and left out of the
means, never guessed.
"""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from perm.evaluation import bootstrap, fmt, need_kind, need_kinds
from perm.prompts import render, split_sections
from perm.protocol import SEEKER_PROTOCOL, parse_seeker, seeker_request

START_EMOTION = 40          # the seeker's emotion before the first reply, as in the Sentient benchmark
TOP = 100                   # reached: the seeker feels fully helped, the dialogue ends
BREAKDOWN = 10              # below it the seeker has given up, the dialogue ends
SEEKER_MAX_TOKENS = 192     # one seeker reply: a reason, a change, a message of a chat's length
ENDINGS = ("goodbye", "breakdown", "at_100", "turn_limit")
FAILED = "failed"           # the seeker broke its protocol (after the judge's retries)


def sent_text(completion: str) -> str:
    """What reaches the seeker: the Response section, or an unformatted answer whole."""
    sections = split_sections(completion)
    return sections[1] if sections else completion.strip()


@dataclass(eq=False)
class Dialogue:
    """One model talking with the seeker of one case. Each turn is a dict: `seeker` (the message the
    model answers), the model's `completion` (with its Analysis), `formatted`, `sent` (what reached
    the seeker), `completion_tokens`, `truncated`, then the seeker's `change`, `reason`, `emotion`
    (after the change), `message` (its next message, or its last words) and `goodbye`; or
    `seeker_error` and the seeker's raw `seeker_text` when its reply broke the protocol."""
    model: str
    case: dict
    turns: list = field(default_factory=list)
    emotion: int = START_EMOTION
    ended: str = ""             # "" while it goes on, then one of ENDINGS or FAILED

    def said_last(self) -> str:
        return self.turns[-1]["message"] if self.turns else self.case["query"]

    def supporter_chat(self) -> list[dict]:
        """The model's prompt: the case's policy prompt (its first message included), then each
        earlier turn as it was said (the model's sent text, the seeker's next message)."""
        chat = [dict(m) for m in self.case["prompt"]]
        for t in self.turns:
            chat += [{"role": "assistant", "content": t["sent"]}, {"role": "user", "content": t["message"]}]
        return chat

    def answer(self, sample: dict) -> None:
        """The model's answer (a perm.generation sample: text, completion_tokens, truncated)."""
        self.turns.append({"turn": len(self.turns) + 1, "seeker": self.said_last(), "completion": sample["text"],
                           "formatted": split_sections(sample["text"]) is not None, "sent": sent_text(sample["text"]),
                           "completion_tokens": sample["completion_tokens"], "truncated": sample["truncated"]})

    def seeker_request(self, temperature: float):
        exchanges = [(t["seeker"], t["sent"]) for t in self.turns]
        return seeker_request(self.case, exchanges, self.emotion, SEEKER_MAX_TOKENS, temperature)

    def hear(self, judgment, turn_limit: int) -> None:
        """The seeker's judgment of the last answer: the emotion moves, the dialogue may end."""
        turn = self.turns[-1]
        reply = parse_seeker(judgment.text) if judgment.score is not None else None
        if reply is None:
            turn.update(seeker_error=judgment.error or "reply out of the seeker protocol", seeker_text=judgment.text)
            self.ended = FAILED
            return
        self.emotion = max(0, min(TOP, self.emotion + reply.change))
        turn.update(change=reply.change, reason=reply.reason, emotion=self.emotion, message=reply.message,
                    goodbye=reply.goodbye)
        if self.emotion >= TOP:
            self.ended = "at_100"
        elif self.emotion < BREAKDOWN:
            self.ended = "breakdown"
        elif reply.goodbye:
            self.ended = "goodbye"
        elif len(self.turns) >= turn_limit:
            self.ended = "turn_limit"

    def final_emotion(self) -> int | None:
        return None if self.ended == FAILED else self.emotion

    def record(self) -> dict:
        """The dialogue as one JSON line of dialogues.jsonl."""
        keep = ("id", "need_kind", "persona", "scenario", "query", "hidden_need")
        return {"model": self.model, **{("case_id" if k == "id" else k): self.case.get(k) for k in keep},
                "start_emotion": START_EMOTION, "final_emotion": self.final_emotion(), "ended": self.ended,
                "turns": self.turns}


# ---------------------------------------------------------------- running dialogues

def seeker_from_settings(s, eval_judge) -> tuple:
    """(the seeker's judge, a description for the report) from 05's SEEKER* settings, each empty one
    taking the eval judge's (EVAL_JUDGE, EVAL_JUDGE_MODEL, EVAL_JUDGE_BASE_URL); the other judge
    settings (timeout, retries, cache, ...) are the eval judge's. When all three match, the seeker is
    the eval judge itself: one model loaded, one set of counts."""
    backend, model, base_url = (s[f"SEEKER{k}"] or s[f"EVAL_JUDGE{k}"] for k in ("", "_MODEL", "_BASE_URL"))
    described = f"`{backend}` `{model}`" + (f" at {base_url}" if base_url else "")
    if (backend, model, base_url) == (s["EVAL_JUDGE"], s["EVAL_JUDGE_MODEL"], s["EVAL_JUDGE_BASE_URL"]):
        return eval_judge, described + ", the eval judge"
    from perm.judges import judge_from_settings
    return judge_from_settings(s, prefix="EVAL_JUDGE", backend=backend, model=model, base_url=base_url), described


def talk(name: str, reply, cases: list[dict], seeker, turn_limit: int, seeker_temperature: float,
         show=print) -> list[Dialogue]:
    """One model's dialogues over `cases`. `reply(chats, turn)` answers every open dialogue at once
    (a list of perm.generation samples), so generation is batched over cases per turn; the seeker
    then judges every answer in one batch. `show` prints a line per turn (and the first dialogue's
    exchange, so a run shows real text)."""
    dialogues = [Dialogue(name, case) for case in cases]
    for turn in range(1, turn_limit + 1):
        going = [d for d in dialogues if not d.ended]
        if not going:
            break
        for d, sample in zip(going, reply([d.supporter_chat() for d in going], turn)):
            d.answer(sample)
        for d, judgment in zip(going, seeker.judge([d.seeker_request(seeker_temperature) for d in going])):
            d.hear(judgment, turn_limit)
        first = dialogues[0]
        if any(d is first for d in going) and "emotion" in first.turns[-1]:
            t, before = first.turns[-1], first.turns[-2]["emotion"] if len(first.turns) > 1 else START_EMOTION
            show(f"[dialogue] {name} / {first.case['id']}, turn {turn}: emotion {before} -> "
                 f"{t['emotion']} ({t['reason'][:100]}); seeker{' (goodbye)' if t['goodbye'] else ''}: "
                 f"{t['message'][:160]!r}")
        open_ = [d for d in dialogues if not d.ended]
        show(f"[dialogue] {name} turn {turn}/{turn_limit}: {len(open_)} of {len(dialogues)} going on, mean emotion "
             f"{np.mean([d.emotion for d in dialogues if d.ended != FAILED] or [np.nan]):.1f}, "
             f"{sum(d.ended == FAILED for d in dialogues)} failed")
    return dialogues


def run_dialogues(models: dict, cases: list[dict], seeker, *, runs_dir, load_in_4bit, turn_limit: int,
                  max_new_tokens: int, temperature: float, seeker_temperature: float, seed: int) -> tuple[dict, dict]:
    """({model name: [Dialogue]}, the seeker's counts over these dialogues) for every model of
    `models` (05's resolved entries), each loaded as 05 loads it and answering through
    perm.generation's sampling with 05's sampling settings (seeded per turn)."""
    import torch
    from perm.generation import sample_answers
    from perm.models import load_model
    before = dataclasses.replace(seeker.stats)
    out = {}
    for name, entry in models.items():
        print(f"[dialogue] {name}: {len(cases)} dialogue(s) of up to {turn_limit} answers")
        model, tok = load_model(entry["model"], runs_dir, adapter=entry["adapter"], load_in_4bit=load_in_4bit)

        def reply(chats, turn):
            return [group[0] for group in sample_answers(model, tok, chats, 1, max_new_tokens, temperature,
                                                         seed=seed + turn)]
        out[name] = talk(name, reply, cases, seeker, turn_limit, seeker_temperature)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    after = seeker.stats
    counts = {f"dialogue/seeker_{k}": getattr(after, k) - getattr(before, k)
              for k in ("calls", "failures", "retries", "cache_hits", "prompt_tokens", "completion_tokens")}
    return out, counts


def cost_line(n_models: int, cases: list[dict], turn_limit: int, max_new_tokens: int) -> str:
    """What the dialogues cost when every one runs to the turn limit with every answer and seeker
    reply as long as allowed (about 4 characters a token), printed before they start; retries add to it."""
    calls = n_models * len(cases) * turn_limit
    prompt = 0
    for case in cases:
        base = sum(len(m["content"]) for m in render(
            "seeker", persona=case["persona"], scenario=case["scenario"], emotion=str(START_EMOTION),
            hidden_need_note=case.get("hidden_need") or "", transcript=case["query"],
            output_instructions=SEEKER_PROTOCOL)) // 4
        prompt += sum(base + t * max_new_tokens + (t - 1) * SEEKER_MAX_TOKENS for t in range(1, turn_limit + 1))
    return (f"dialogues: {n_models} model(s) x {len(cases)} case(s) x up to {turn_limit} turns: at most {calls} seeker "
            f"replies (API calls; a local seeker writes each in four passes, each reading the prompt), about "
            f"{n_models * prompt:,} prompt and {calls * SEEKER_MAX_TOKENS:,} completion tokens if every dialogue runs "
            f"to the limit (retries add to it; cached replies cost nothing), and up to "
            f"{calls} answers of {max_new_tokens} tokens to sample")


# ---------------------------------------------------------------- metrics, plot, report, transcripts

def dialogue_metrics(dialogues: dict, reference: str, resamples: int, seed: int) -> dict:
    """Per model: `<model>/dialogue/final_emotion` with `_ci_low`/`_ci_high` (over cases), the
    share of dialogues by ending (`ended_<ending>`), mean answers per dialogue (`turns`), counts
    (`dialogues`, `failed`), and per need kind (`<model>/dialogue/kind/<need_kind>/final_emotion`
    with intervals, `/cases`); `<model>_minus_<reference>/dialogue/final_emotion`, paired by case."""
    metrics = {}

    def put(key, values):
        metrics[key], metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = bootstrap(values, resamples, seed)

    for name, ds in dialogues.items():
        done = [d for d in ds if d.ended != FAILED]
        put(f"{name}/dialogue/final_emotion", [d.emotion for d in done])
        metrics[f"{name}/dialogue/dialogues"], metrics[f"{name}/dialogue/failed"] = len(ds), len(ds) - len(done)
        metrics[f"{name}/dialogue/turns"] = float(np.mean([len(d.turns) for d in done])) if done else float("nan")
        for ending in ENDINGS:
            metrics[f"{name}/dialogue/ended_{ending}"] = (sum(d.ended == ending for d in done) / len(done)
                                                          if done else float("nan"))
        by_kind = defaultdict(list)
        for d in done:
            by_kind[need_kind(d.case)].append(d.emotion)
        for kind, values in by_kind.items():
            put(f"{name}/dialogue/kind/{kind}/final_emotion", values)
            metrics[f"{name}/dialogue/kind/{kind}/cases"] = len(values)
    theirs = {d.case["id"]: d.emotion for d in dialogues.get(reference, []) if d.ended != FAILED}
    for name, ds in dialogues.items():
        if name != reference and theirs:
            put(f"{name}_minus_{reference}/dialogue/final_emotion",
                [d.emotion - theirs[d.case["id"]] for d in ds if d.ended != FAILED and d.case["id"] in theirs])
    return metrics


def emotion_curve(dialogues: list[Dialogue], turn_limit: int) -> list[float]:
    """The mean emotion after each turn (0 = before the first answer); an ended dialogue keeps its
    final emotion. Failed dialogues are left out."""
    done = [d for d in dialogues if d.ended != FAILED]
    if not done:
        return [float("nan")] * (turn_limit + 1)
    paths = [[START_EMOTION] + [t["emotion"] for t in d.turns] for d in done]
    return [float(np.mean([p[min(t, len(p) - 1)] for p in paths])) for t in range(turn_limit + 1)]


def plot_dialogues(dialogues: dict, turn_limit: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ds in dialogues.items():
        ax.plot(range(turn_limit + 1), emotion_curve(ds, turn_limit), marker="o", label=name)
    ax.axhline(BREAKDOWN, color="#bbbbbb", linestyle=":", linewidth=1)
    ax.set_xlabel("turn (answers so far)")
    ax.set_ylabel("mean seeker emotion (0-100)")
    ax.set_ylim(0, TOP)
    ax.set_xticks(range(turn_limit + 1))
    ax.set_title("the simulated seeker's emotion (ended dialogues keep their last value)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_transcripts(dialogues: dict, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ds in dialogues.values():
            for d in ds:
                f.write(json.dumps(d.record(), ensure_ascii=False) + "\n")


def dialogue_section(metrics: dict, dialogues: dict, reference: str, seeker: str, turn_limit: int,
                 max_failure_rate: float) -> list[str]:
    """The report's dialogue section: final emotion with intervals and paired differences, how the
    dialogues ended, and the final emotion per need kind."""
    names = list(dialogues)
    cases = len(next(iter(dialogues.values())))
    lines = ["", "## Dialogues with a simulated seeker", "",
             f"{cases} test case(s) talked through with each model, up to {turn_limit} answers each. The seeker "
             f"({seeker}) plays the case's persona with its hidden need, never stated; only each answer's Response "
             f"reaches it. Its emotion starts at {START_EMOTION} and moves by at most ±10 per answer; a dialogue ends "
             f"at the turn limit, at a goodbye, at {TOP}, or below {BREAKDOWN}. Score: the final emotion (0-100), "
             "with bootstrap 95% intervals over cases; dialogues whose seeker broke its protocol are failed, left "
             "out and counted. Transcripts: `dialogues.jsonl`.", ""]
    failed = sum(metrics[f"{n}/dialogue/failed"] for n in names)
    total = sum(metrics[f"{n}/dialogue/dialogues"] for n in names)
    if total and failed > max_failure_rate * total:
        lines += [f"**Warning: {failed} of {total} dialogues failed (the seeker broke its protocol): more than "
                  f"MAX_JUDGE_FAILURE_RATE={max_failure_rate}; the figures below rest on the rest.**", ""]
    lines += [f"| model | final emotion | − {reference} (paired) | goodbye | breakdown (< {BREAKDOWN}) | at {TOP} "
              "| turn limit | answers per dialogue | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {fmt(metrics, f'{n}/dialogue/final_emotion', 1)} | "
                     + (fmt(metrics, f"{n}_minus_{reference}/dialogue/final_emotion", 1) if n != reference else "")
                     + " | " + " | ".join(fmt(metrics, f"{n}/dialogue/ended_{e}", 2) for e in ENDINGS)
                     + f" | {fmt(metrics, f'{n}/dialogue/turns', 1)} | {metrics[f'{n}/dialogue/failed']} |")
    kinds = need_kinds({n: [d.case for d in ds] for n, ds in dialogues.items()})
    lines += ["", "Final emotion per need kind (few cases: wide intervals):", "",
              "| need kind | cases | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for k in kinds:
        count = next((metrics[f"{n}/dialogue/kind/{k}/cases"] for n in names
                      if f"{n}/dialogue/kind/{k}/cases" in metrics), 0)
        lines.append(f"| {k} | {count} | " + " | ".join(fmt(metrics, f"{n}/dialogue/kind/{k}/final_emotion", 1)
                                                       for n in names) + " |")
    return lines


def transcript_section(dialogues: dict, shown: int, chars: int = 700) -> list[str]:
    """The first `shown` cases' dialogues with every model, as the seeker lived them."""
    lines = ["## Dialogues side by side", ""]
    names = list(dialogues)
    for k in range(min(shown, len(dialogues[names[0]]))):
        case = dialogues[names[0]][k].case
        lines += [f"### {case['id']}", ""]
        for n in names:
            d = dialogues[n][k]
            lines += [f"**{n}** (final emotion {d.final_emotion()}, ended: {d.ended}):", ""]
            before = START_EMOTION
            for t in d.turns:
                lines += [f"> *seeker:* {t['seeker'][:chars]}", "", f"*{n}:* {t['sent'][:chars]}", ""]
                if "emotion" in t:
                    lines += [f"*emotion {before} → {t['emotion']} ({t['change']:+d}): "
                              f"{t['reason']}*" + (f" — goodbye: {t['message'][:chars]}" if t["goodbye"] else ""), ""]
                    before = t["emotion"]
                else:
                    lines += [f"*the seeker's reply broke its protocol ({t['seeker_error']})*", ""]
    return lines

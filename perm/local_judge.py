"""The local judge: a Hugging Face causal LM in-process, scores from digit probabilities.

For every 1-5 judgment the score is the expectation over the digits 1-5 at the score position:
`direct` mode feeds the prompt plus the assistant prefix `Score:` and reads one forward pass;
`reasoned` mode first samples a short reason (JUDGE_TEMPERATURE), then appends `Score:` and reads
the same position. The score position is found by tokenizing `Score: 1` ... `Score: 5` and taking
the first token where they differ, so tokenizers that split `Score: 5` as `Score`,`:`,` `,`5` or
`Score`,`:`,` 5` both work. The bystander always rates its five criteria this way (1-5 each, mapped
to 0-20): multi-digit totals are not one token.
"""
from __future__ import annotations

import contextlib
import re

import torch

from perm.judges import DIGITS, SCORE_PREFIX, Judgment, JudgeStats, expected_digit

_PROTOCOL = re.compile(r"^\s*[*_-]*\s*(score|total)", re.IGNORECASE)


class LocalBackend:
    bystander_by_criteria = True

    def __init__(self, path: str, mode: str, temperature: float, batch_size: int, max_reason_tokens: int,
                 loaded=None, context=None):
        if loaded is None:
            from perm.models import load_tokenizer
            from transformers import AutoModelForCausalLM
            loaded = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), load_tokenizer(path))
        self.model, self.tok = loaded
        self.mode, self.temperature = mode, temperature
        self.batch_size, self.max_reason_tokens = batch_size, max_reason_tokens
        self.stats = JudgeStats()
        self.context = context or contextlib.nullcontext   # e.g. a policy's disable_adapter

    def judge(self, requests, on_done=None) -> list[Judgment]:
        with self.context():
            return self._judge(requests, on_done)

    def _judge(self, requests, on_done) -> list[Judgment]:
        heads = [self.tok.apply_chat_template(r.chat(), add_generation_prompt=True, tokenize=False) for r in requests]
        out: list[Judgment | None] = [None] * len(requests)
        texts = [i for i, r in enumerate(requests) if r.kind == "text"]
        for i, text in zip(texts, self._generate([heads[i] for i in texts], [requests[i] for i in texts])):
            out[i] = Judgment(None, text, error="" if text else "empty reply")
        scored = [i for i, r in enumerate(requests) if r.kind != "text"]
        if scored:
            reasons = (self._reasons([heads[i] for i in scored]) if self.mode == "reasoned" else [""] * len(scored))
            prefixes = [heads[i] + (f"{r}\n" if r else "") + SCORE_PREFIX for i, r in zip(scored, reasons)]
            for i, r, s in zip(scored, reasons, self._expected_scores(prefixes)):
                out[i] = Judgment(s, f"{r}\n{SCORE_PREFIX} {s:.2f}".strip() if s is not None else r,
                                  error="" if s is not None else "no probability mass on the digits 1-5")
        if on_done:
            for i, judgment in enumerate(out):
                on_done(i, judgment)
        return out

    def _reasons(self, heads: list[str]) -> list[str]:
        out = []
        for text in self._generate(heads, [None] * len(heads)):
            kept = []
            for line in text.splitlines():  # the judge's own score line is replaced by the forced one
                if _PROTOCOL.match(line):
                    break
                kept.append(line)
            out.append("\n".join(kept).strip())
        return out

    @torch.no_grad()
    def _generate(self, heads: list[str], requests) -> list[str]:
        """Sampled continuations; a text request brings its own budget and temperature."""
        out = []
        for i in range(0, len(heads), self.batch_size):
            chunk, reqs = heads[i:i + self.batch_size], requests[i:i + self.batch_size]
            first = reqs[0]
            budget = first.max_tokens if first is not None else self.max_reason_tokens
            temperature = first.temperature if first is not None and first.temperature >= 0 else self.temperature
            enc = self.tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = self.model.generate(**enc, max_new_tokens=budget, do_sample=temperature > 0,
                                      temperature=temperature or None, top_p=None, top_k=None,
                                      pad_token_id=self.tok.pad_token_id)
            self.stats.calls += len(chunk)
            self.stats.prompt_tokens += int(enc["attention_mask"].sum())
            for row in gen[:, enc["input_ids"].shape[1]:]:
                self.stats.completion_tokens += int((row != self.tok.pad_token_id).sum())
                out.append(self.tok.decode(row, skip_special_tokens=True).strip())
        return out

    def _digit_position(self, prefix: str) -> tuple[list[int], dict[str, int]]:
        """(context ids, {digit: token id at the score position})."""
        seqs = {d: self.tok(f"{prefix} {d}", add_special_tokens=False)["input_ids"] for d in DIGITS}
        first = seqs["1"]
        cut = next(i for i in range(len(first)) if any(len(s) <= i or s[i] != first[i] for s in seqs.values()))
        return first[:cut], {d: s[cut] for d, s in seqs.items()}

    @torch.no_grad()
    def _expected_scores(self, prefixes: list[str]) -> list[float | None]:
        scores = []
        for i in range(0, len(prefixes), self.batch_size):
            items = [self._digit_position(p) for p in prefixes[i:i + self.batch_size]]
            width = max(len(ids) for ids, _ in items)
            pad = self.tok.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in items])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in items])
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits[:, -1, :].float()
            probs = torch.softmax(logits, dim=-1)
            self.stats.calls += len(items)
            self.stats.prompt_tokens += int(mask.sum())
            for row, (_, digit_ids) in zip(probs, items):
                scores.append(expected_digit({d: float(row[t]) for d, t in digit_ids.items()}))
        return scores

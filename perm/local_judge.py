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

from perm.judges import (DIGITS, PREFERENCE_OPTIONS, PREFERENCE_PREFIX, PREFERENCE_SCORE, SCORE_PREFIX, Judgment,
                         JudgeStats, expected_digit)

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
        scored = [i for i, r in enumerate(requests) if r.kind not in ("text", "choice")]
        if scored:
            reasons = (self._reasons([heads[i] for i in scored]) if self.mode == "reasoned" else [""] * len(scored))
            prefixes = [heads[i] + (f"{r}\n" if r else "") + SCORE_PREFIX for i, r in zip(scored, reasons)]
            for i, r, s in zip(scored, reasons, self._expected_scores(prefixes)):
                out[i] = Judgment(s, f"{r}\n{SCORE_PREFIX} {s:.2f}".strip() if s is not None else r,
                                  error="" if s is not None else "no probability mass on the digits 1-5")
        choices = [i for i, r in enumerate(requests) if r.kind == "choice"]
        if choices:
            reasons = (self._reasons([heads[i] for i in choices]) if self.mode == "reasoned" else [""] * len(choices))
            prefixes = [heads[i] + (f"{r}\n" if r else "") + PREFERENCE_PREFIX for i, r in zip(choices, reasons)]
            for i, r, verdict in zip(choices, reasons, self._choices(prefixes)):
                out[i] = Judgment(PREFERENCE_SCORE[verdict], f"{r}\n{PREFERENCE_PREFIX} {verdict}".strip())
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

    @torch.no_grad()
    def _choices(self, prefixes: list[str]) -> list[str]:
        """The most probable of A / B / tie at each prefix's verdict position."""
        out = []
        for start in range(0, len(prefixes), self.batch_size):
            items = [self._digit_position(p, PREFERENCE_OPTIONS) for p in prefixes[start:start + self.batch_size]]
            for probs, (_, ids) in zip(self._forward_batch([c for c, _ in items]), items):
                out.append(max(PREFERENCE_OPTIONS, key=lambda o: float(probs[ids[o]])))
        return out

    def _digit_position(self, prefix: str, options=DIGITS) -> tuple[list[int], dict[str, int]]:
        """(context ids, {option: token id at the answer position})."""
        seqs = {d: self.tok(f"{prefix} {d}", add_special_tokens=False)["input_ids"] for d in options}
        first = seqs[options[0]]
        cut = next(i for i in range(len(first)) if any(len(s) <= i or s[i] != first[i] for s in seqs.values()))
        return first[:cut], {d: s[cut] for d, s in seqs.items()}

    @torch.no_grad()
    def _expected_scores(self, prefixes: list[str]) -> list[float | None]:
        """Expected digit at each prefix's score position. Prompts that share most of their tokens
        (the bystander's five criteria differ only in their last lines) share one forward pass over
        the common part, through the KV cache; the rest are batched."""
        items = [self._digit_position(p) for p in prefixes]
        scores: list[float | None] = [None] * len(items)
        groups, singles = self._shared_groups([ids for ids, _ in items]), []
        for group in groups:
            if len(group) == 1:
                singles += group
                continue
            for i, probs in zip(group, self._forward_shared([items[i][0] for i in group])):
                scores[i] = expected_digit({d: float(probs[t]) for d, t in items[i][1].items()})
        for start in range(0, len(singles), self.batch_size):
            chunk = singles[start:start + self.batch_size]
            for i, probs in zip(chunk, self._forward_batch([items[i][0] for i in chunk])):
                scores[i] = expected_digit({d: float(probs[t]) for d, t in items[i][1].items()})
        return scores

    @staticmethod
    def _shared_groups(seqs: list[list[int]], share: float = 0.8) -> list[list[int]]:
        """Consecutive sequences whose common prefix is at least `share` of each one's length."""
        groups, common = [], None
        for i, ids in enumerate(seqs):
            if groups and common is not None:
                n = next((k for k, (a, b) in enumerate(zip(common, ids)) if a != b), min(len(common), len(ids)))
                if n >= share * len(ids) and n >= share * len(common):
                    groups[-1].append(i)
                    common = common[:n]
                    continue
            groups.append([i])
            common = ids
        return groups

    def _forward_batch(self, seqs: list[list[int]]):
        width = max(len(ids) for ids in seqs)
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in seqs], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in seqs], device=self.model.device)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits[:, -1, :].float()
        self.stats.calls += len(seqs)
        self.stats.prompt_tokens += int(mask.sum())
        return torch.softmax(logits, dim=-1)

    def _forward_shared(self, seqs: list[list[int]]):
        from transformers import DynamicCache
        n = min(next((k for k, col in enumerate(zip(*seqs)) if len(set(col)) > 1), min(map(len, seqs))),
                min(map(len, seqs)) - 1)                  # keep at least one token per suffix
        cache = DynamicCache()
        self.model(input_ids=torch.tensor([seqs[0][:n]], device=self.model.device), past_key_values=cache,
                   use_cache=True)
        out = []
        for ids in seqs:
            logits = self.model(input_ids=torch.tensor([ids[n:]], device=self.model.device), past_key_values=cache,
                                use_cache=True).logits[0, -1, :].float()
            cache.crop(-(len(ids) - n))        # back to the shared prefix
            out.append(torch.softmax(logits, dim=-1))
        self.stats.calls += len(seqs)
        self.stats.prompt_tokens += n + sum(len(ids) - n for ids in seqs)
        return out

"""The local judge: a Hugging Face causal LM in-process, scores from digit probabilities.

For every 1-5 judgment the score is the expectation over the digits 1-5 at the score position:
`direct` mode feeds the prompt plus the assistant prefix `Score:` and reads one forward pass;
`reasoned` mode first samples a short reason (JUDGE_TEMPERATURE, JUDGE_TOP_P), then appends
`Score:` and reads the same position. The score position is found by tokenizing `Score: 1` ...
`Score: 5` and taking the first token where they differ, so tokenizers that split `Score: 5` as
`Score`,`:`,` `,`5` or `Score`,`:`,` 5` both work. The bystander always rates its five criteria this
way (1-5 each, mapped to 0-20): multi-digit totals are not one token.

The judge may be the policy being trained (04 shares its base: adapters off while judging). Judging
therefore always runs in inference state, whatever state training left the model in: eval mode (and
Unsloth's inference mode), gradient checkpointing off, adapters disabled; the previous state is
restored afterwards. Forward passes compute logits at the last position only (`logits_to_keep=1`),
and a shared-prefix KV cache is used only where it is verified to have been filled.
"""
from __future__ import annotations

import contextlib
import re

import torch

from perm import USE_UNSLOTH
from perm.models import inference_state
from perm.protocol import (DIGITS, PREFERENCE_OPTIONS, PREFERENCE_PREFIX, PREFERENCE_SCORE, SCORE_PREFIX, Judgment,
                           JudgeStats, expected_digit)

_PROTOCOL = re.compile(r"^\s*[*_-]*\s*(score|total)", re.IGNORECASE)


@contextlib.contextmanager
def judging_state(model):
    """Inference state (`perm.models.inference_state`) with the adapters disabled: a PEFT model
    judges as its base."""
    adapters = model.disable_adapter() if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") \
        else contextlib.nullcontext()
    with inference_state(model), adapters:
        yield


class LocalBackend:
    bystander_by_criteria = True

    def __init__(self, path: str, mode: str, temperature: float, batch_size: int, max_reason_tokens: int,
                 loaded=None, top_p: float = 1.0):
        if loaded is None:
            from perm.models import load_model
            loaded = load_model(path, runs_dir=None)
        self.model, self.tok = loaded
        self.mode, self.temperature, self.top_p = mode, temperature, top_p
        self.batch_size, self.max_reason_tokens = batch_size, max_reason_tokens
        self.stats = JudgeStats()
        # A shared-prefix KV cache is a plain-path optimization: Unsloth's forward never fills a
        # caller's cache. It is also checked on every use (see _forward_shared).
        self.share_prefixes = not USE_UNSLOTH

    def judge(self, requests, on_done=None) -> list[Judgment]:
        with judging_state(self.model):
            return self._judge(requests, on_done)

    @property
    def device(self):
        return next(self.model.parameters()).device

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
                                  error="" if s is not None else "no finite probability mass on the digits 1-5")
        choices = [i for i, r in enumerate(requests) if r.kind == "choice"]
        if choices:
            reasons = (self._reasons([heads[i] for i in choices]) if self.mode == "reasoned" else [""] * len(choices))
            prefixes = [heads[i] + (f"{r}\n" if r else "") + PREFERENCE_PREFIX for i, r in zip(choices, reasons)]
            for i, r, verdict in zip(choices, reasons, self._choices(prefixes)):
                out[i] = (Judgment(PREFERENCE_SCORE[verdict], f"{r}\n{PREFERENCE_PREFIX} {verdict}".strip())
                          if verdict else Judgment(None, r, error="no finite probability on A / B / tie"))
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
            self.stats.prompt_tokens += int(enc["attention_mask"].sum())
            enc = {k: v.to(self.device) for k, v in enc.items()}   # Unsloth's generate does not move them
            sampling = {"temperature": temperature, "top_p": self.top_p} if temperature > 0 else \
                {"temperature": None, "top_p": None}
            gen = self.model.generate(**enc, max_new_tokens=budget, do_sample=temperature > 0, top_k=None,
                                      pad_token_id=self.tok.pad_token_id, **sampling)
            self.stats.calls += len(chunk)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                self.stats.completion_tokens += int((row != self.tok.pad_token_id).sum())
                out.append(self.tok.decode(row, skip_special_tokens=True).strip())
        return out

    @torch.no_grad()
    def _choices(self, prefixes: list[str]) -> list[str | None]:
        """The most probable of A / B / tie at each prefix's verdict position (None if not finite)."""
        out = []
        for start in range(0, len(prefixes), self.batch_size):
            items = [self._digit_position(p, PREFERENCE_OPTIONS) for p in prefixes[start:start + self.batch_size]]
            for probs, (_, ids) in zip(self._forward_batch([c for c, _ in items]), items):
                values = {o: float(probs[ids[o]]) for o in PREFERENCE_OPTIONS}
                finite = all(v == v and v not in (float("inf"), float("-inf")) for v in values.values())
                out.append(max(values, key=values.get) if finite else None)
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
        the common part through the KV cache where that is possible; the rest are batched."""
        items = [self._digit_position(p) for p in prefixes]
        scores: list[float | None] = [None] * len(items)
        groups = self._shared_groups([ids for ids, _ in items]) if self.share_prefixes else [[i] for i in range(len(items))]
        singles = []
        for group in groups:
            shared = self._forward_shared([items[i][0] for i in group]) if len(group) > 1 else None
            if shared is None:
                singles += group
                continue
            for i, probs in zip(group, shared):
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

    def _last_logits(self, **inputs):
        """Logits at the last position only: a full batch x length x vocabulary tensor is the
        largest movable memory term of a judge forward (3.4 GiB for 8 x 1500 tokens of Qwen)."""
        logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
        if logits.shape[-1] < len(self.tok):
            raise RuntimeError(f"the judge's forward returned {logits.shape[-1]} values per position, not logits "
                               f"over its {len(self.tok)}-token vocabulary")
        return logits

    def _forward_batch(self, seqs: list[list[int]]):
        width = max(len(ids) for ids in seqs)
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in seqs], device=self.device)
        logits = self._last_logits(input_ids=input_ids, attention_mask=mask)
        self.stats.calls += len(seqs)
        self.stats.prompt_tokens += int(mask.sum())
        return torch.softmax(logits, dim=-1)

    def _forward_shared(self, seqs: list[list[int]]):
        """Softmax at the end of each sequence, the common prefix computed once through a KV cache;
        None when the model did not fill the cache (the caller then batches them whole)."""
        from transformers import DynamicCache
        n = min(next((k for k, col in enumerate(zip(*seqs)) if len(set(col)) > 1), min(map(len, seqs))),
                min(map(len, seqs)) - 1)                  # keep at least one token per suffix
        cache = DynamicCache()
        self.model(input_ids=torch.tensor([seqs[0][:n]], device=self.device), past_key_values=cache,
                   use_cache=True, logits_to_keep=1)
        if cache.get_seq_length() != n:
            self.share_prefixes = False                   # this model ignores a caller's cache
            return None
        out = []
        for ids in seqs:
            logits = self._last_logits(input_ids=torch.tensor([ids[n:]], device=self.device),
                                       past_key_values=cache, use_cache=True)[0]
            cache.crop(-(len(ids) - n))                   # back to the shared prefix
            out.append(torch.softmax(logits, dim=-1))
        self.stats.calls += len(seqs)
        self.stats.prompt_tokens += n + sum(len(ids) - n for ids in seqs)
        return out

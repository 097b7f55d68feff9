"""The local judge: a Hugging Face causal LM in-process, scores from digit probabilities.

For every 1-5 judgment the score is read at the score position: `direct` mode feeds the prompt plus
the assistant prefix `Score:` and reads one forward pass; `reasoned` mode first samples a short
reason (JUDGE_TEMPERATURE, JUDGE_TOP_P), then appends `Score:` and reads the same position. With
JUDGE_SCORE=expected the score is the expectation over the digits 1-5 there; with `sampled` (the
paper's: the digit the judge writes) it is a digit drawn there at JUDGE_TEMPERATURE and JUDGE_TOP_P
by a generator seeded with the prompt, or in reasoned mode the digit of the judge's own score line
when its reason ends with one. The score position is found by tokenizing `Score: 1` ...
`Score: 5` and taking the first token where they differ, so tokenizers that split `Score: 5` as
`Score`,`:`,` `,`5` or `Score`,`:`,` 5` both work. The bystander always rates its five criteria this
way (1-5 each, mapped to 0-20): multi-digit totals are not one token.

The judge may be the policy being trained (04 shares its base: adapters off while judging). Judging
therefore always runs in inference state, whatever state training left the model in: eval mode (and
Unsloth's inference mode), gradient checkpointing off, adapters disabled; the previous state is
restored afterwards. Forward passes compute logits at the last position only (`logits_to_keep=1`)
and build no KV cache (`use_cache=False`), except the shared-prefix cache, which is used only where
it is verified to give what whole forwards give. A request longer than the model takes is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import re

import torch

from perm import USE_UNSLOTH
from perm.models import inference_state
from perm.protocol import (DIGITS, MAX_CHANGE, PREFERENCE_OPTIONS, PREFERENCE_PREFIX, PREFERENCE_SCORE, SAFETY_CHECKS,
                           SCORE_PREFIX, SEEKER_LINE, SEEKER_PREFIX, Judgment, JudgeStats, expected_digit, parse_likert,
                           parse_safety, parse_seeker, safety_judgment, sample_digit)

PREFIX_TOLERANCE = 0.05     # largest total variation between a cached and a whole forward's next-token distribution
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
                 loaded=None, top_p: float = 1.0, *, score: str, load_in_4bit: bool | None, retries: int):
        if loaded is None:
            from perm.models import load_judge_model
            *loaded, self.loader = load_judge_model(path, load_in_4bit=load_in_4bit)
        else:                                             # 04's policy: loaded as the process's path loads it
            self.loader = "unsloth" if USE_UNSLOTH else "transformers"
        self.model, self.tok = loaded
        # The longest sequence the model takes: Unsloth keeps only the first `max_seq_length` tokens
        # of any input to a model it loaded, so a longer judge request is refused, never cut.
        self.max_length = getattr(self.model, "max_seq_length", None) or \
            getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        self.mode, self.temperature, self.top_p, self.score = mode, temperature, top_p, score
        self.batch_size, self.max_reason_tokens = batch_size, max_reason_tokens
        self.retries = retries        # JUDGE_RETRIES: a seeker's reply out of protocol is written again
        self._numbers = None          # {token id: text} of the tokens a seeker's change may be written with
        self.stats = JudgeStats()
        # A shared-prefix KV cache on every path, checked once against whole forwards (_forward_shared):
        # Unsloth's forward returns a new cache instead of filling the caller's, so the one returned is used.
        self.share_prefixes, self.prefixes_checked = True, False

    def judge(self, requests, on_done=None) -> list[Judgment]:
        with judging_state(self.model):
            return self._judge(requests, on_done)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _judge(self, requests, on_done) -> list[Judgment]:
        heads = [self.tok.apply_chat_template(r.chat(), add_generation_prompt=True, tokenize=False,
                                              enable_thinking=False)   # a judge that thinks first (Qwen3) scores late
                 for r in requests]
        out: list[Judgment | None] = [None] * len(requests)
        texts = [i for i, r in enumerate(requests) if r.kind == "text"]
        for i, text in zip(texts, self._generate([heads[i] for i in texts], [requests[i] for i in texts])):
            out[i] = Judgment(None, text, error="" if text else "empty reply")
        for kind, read in (("seeker", self._seeker_replies), ("safety", self._safety_checks)):
            mine = [i for i, r in enumerate(requests) if r.kind == kind]
            if mine:
                for i, judgment in zip(mine, read([heads[i] for i in mine], [requests[i] for i in mine])):
                    out[i] = judgment
        scored = [i for i, r in enumerate(requests) if r.kind not in ("text", "choice", "seeker", "safety")]
        if scored:
            reasons, written = (self._reasons([heads[i] for i in scored]) if self.mode == "reasoned"
                                else ([""] * len(scored), [None] * len(scored)))
            prefixes = [heads[i] + (f"{r}\n" if r else "") + SCORE_PREFIX for i, r in zip(scored, reasons)]
            for i, r, s in zip(scored, reasons, self._scores(prefixes, written)):
                out[i] = Judgment(s, f"{r}\n{SCORE_PREFIX} {s:.2f}".strip() if s is not None else r,
                                  error="" if s is not None else "no finite probability mass on the digits 1-5")
        choices = [i for i, r in enumerate(requests) if r.kind == "choice"]
        if choices:
            reasons = (self._reasons([heads[i] for i in choices])[0] if self.mode == "reasoned" else [""] * len(choices))
            prefixes = [heads[i] + (f"{r}\n" if r else "") + PREFERENCE_PREFIX for i, r in zip(choices, reasons)]
            for i, r, verdict in zip(choices, reasons, self._choices(prefixes)):
                out[i] = (Judgment(PREFERENCE_SCORE[verdict], f"{r}\n{PREFERENCE_PREFIX} {verdict}".strip())
                          if verdict else Judgment(None, r, error="no finite probability on A / B / tie"))
        if on_done:
            for i, judgment in enumerate(out):
                on_done(i, judgment)
        return out

    def _reasons(self, heads: list[str]) -> tuple[list[str], list[int | None]]:
        """(reasons, the digit of each reason's own score line or None): the judge's own score line
        is cut and replaced by the forced one."""
        out, written = [], []
        for text in self._generate(heads, [None] * len(heads)):
            kept, digit = [], None
            for line in text.splitlines():
                if _PROTOCOL.match(line):
                    digit = parse_likert(line)
                    break
                kept.append(line)
            out.append("\n".join(kept).strip())
            written.append(digit)
        return out, written

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
            self._check_length(enc["input_ids"].shape[1] + budget)
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
    def _choices(self, prefixes: list[str], options=PREFERENCE_OPTIONS, sep: str = " ") -> list[str | None]:
        """The most probable of `options` (A / B / tie) at each prefix's verdict position, after `sep`
        (None if not finite)."""
        out = []
        for start in range(0, len(prefixes), self.batch_size):
            items = [self._digit_position(p, options, sep) for p in prefixes[start:start + self.batch_size]]
            for probs, (_, ids) in zip(self._forward_batch([c for c, _ in items]), items):
                values = {o: float(probs[ids[o]]) for o in options}
                finite = all(v == v and v not in (float("inf"), float("-inf")) for v in values.values())
                out.append(max(values, key=values.get) if finite else None)
        return out

    def _digit_position(self, prefix: str, options=DIGITS, sep: str = " ") -> tuple[list[int], dict[str, int]]:
        """(context ids, {option: token id at the answer position})."""
        seqs = {d: self.tok(f"{prefix}{sep}{d}", add_special_tokens=False)["input_ids"] for d in options}
        first = seqs[options[0]]
        cut = next(i for i in range(len(first)) if any(len(s) <= i or s[i] != first[i] for s in seqs.values()))
        return first[:cut], {d: s[cut] for d, s in seqs.items()}

    def _scores(self, prefixes: list[str], written: list[int | None]) -> list[float | None]:
        """Each prefix's score (JUDGE_SCORE): the expected digit at its score position, or the digit
        the judge writes: its own score line's in reasoned mode, else one drawn at the position."""
        out = []
        for prefix, digit, probs in zip(prefixes, written, self._digit_distributions(prefixes)):
            if self.score == "expected":
                out.append(expected_digit(probs))
            elif digit is not None:
                out.append(float(digit))
            else:
                seed = int.from_bytes(hashlib.sha256(prefix.encode()).digest()[:8], "big")
                out.append(sample_digit(probs, self.temperature, self.top_p, seed))
        return out

    @torch.no_grad()
    def _digit_distributions(self, prefixes: list[str]) -> list[dict[str, float]]:
        """{digit: probability} at each prefix's score position. Prompts that share most of their
        tokens (the bystander's five criteria differ only in their last lines) share one forward
        pass over the common part through the KV cache where that is possible; the rest are batched."""
        items = [self._digit_position(p) for p in prefixes]
        scores: list[dict[str, float]] = [{}] * len(items)
        groups = self._shared_groups([ids for ids, _ in items]) if self.share_prefixes else [[i] for i in range(len(items))]
        singles = []
        for group in groups:
            shared = self._forward_shared([items[i][0] for i in group]) if len(group) > 1 and self.share_prefixes \
                else None
            if shared is None:
                singles += group
                continue
            for i, probs in zip(group, shared):
                scores[i] = {d: float(probs[t]) for d, t in items[i][1].items()}
        for start in range(0, len(singles), self.batch_size):
            chunk = singles[start:start + self.batch_size]
            for i, probs in zip(chunk, self._forward_batch([items[i][0] for i in chunk])):
                scores[i] = {d: float(probs[t]) for d, t in items[i][1].items()}
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
        self._check_length(width)
        logits = self._last_logits(input_ids=input_ids, attention_mask=mask, use_cache=False)  # no KV cache built
        self.stats.calls += len(seqs)
        self.stats.prompt_tokens += int(mask.sum())
        return torch.softmax(logits, dim=-1)

    def _check_length(self, tokens: int) -> None:
        if self.max_length and tokens > self.max_length:
            raise SystemExit(f"error: a judge request of {tokens} tokens is longer than the judge takes "
                             f"({self.max_length}: {'Unsloth keeps only the first max_seq_length tokens' if self.loader == 'unsloth' else 'its max_position_embeddings'}); "
                             f"it would be cut and its score read from the wrong place. Lower MAX_COMPLETION_LENGTH "
                             f"or MAX_NEW_TOKENS, or use a judge with a longer context.")

    def _forward_shared(self, seqs: list[list[int]]):
        """Softmax at the end of each sequence, the common prefix computed once through a KV cache;
        None when sharing is off (the caller then batches them whole). The cache is the one the
        prefix forward returns (transformers fills and returns its own; Unsloth's forward returns a
        new one); after each suffix it is cropped back to the prefix where the forward grew it in
        place. The first group is also run whole and compared: a model whose cached forward differs
        turns sharing off for good."""
        n = min(next((k for k, col in enumerate(zip(*seqs)) if len(set(col)) > 1), min(map(len, seqs))),
                min(map(len, seqs)) - 1)                  # keep at least one token per suffix
        self._check_length(max(map(len, seqs)))
        cache = self.model(input_ids=torch.tensor([seqs[0][:n]], device=self.device), use_cache=True,
                           logits_to_keep=1).past_key_values
        if cache is None or _cache_length(cache) != n:
            self.share_prefixes = False                   # this model keeps no cache
            return None
        out = []
        for ids in seqs:
            logits = self._last_logits(input_ids=torch.tensor([ids[n:]], device=self.device),
                                       past_key_values=cache, use_cache=True)[0]
            grown = _cache_length(cache) - n
            if grown > 0:
                cache.crop(-grown)                        # back to the shared prefix
            out.append(torch.softmax(logits, dim=-1))
        self.stats.calls += len(seqs)
        self.stats.prompt_tokens += n + sum(len(ids) - n for ids in seqs)
        if not self.prefixes_checked:
            whole = self._forward_batch(seqs)
            self.prefixes_checked = True
            if max(0.5 * float((a - b).abs().sum()) for a, b in zip(out, whole)) > PREFIX_TOLERANCE:
                self.share_prefixes = False
                return list(whole)
        return out

    # ---------------------------------------------------------------- the seeker and the safety check (05)

    def _seeker_replies(self, heads: list[str], requests) -> list[Judgment]:
        """The simulated seeker's replies, written into the protocol's own lines (a small model writes
        a line of text well, a form rarely): after `Reason:` one sampled line; after `Change:` a number
        the sampler may write only with a sign and digits within MAX_CHANGE; `Message` or `Goodbye`,
        the likelier at the line's start; then the message, sampled to the end of the turn and cut at
        any line of the protocol. A reply that still breaks the protocol (an empty reason or message,
        no number) is written again, up to JUDGE_RETRIES times, then failed: counted, never guessed."""
        out: list[Judgment] = [None] * len(heads)
        todo = list(range(len(heads)))
        for attempt in range(self.retries + 1):
            self.stats.retries += len(todo) if attempt else 0
            for i, judgment in zip(todo, self._seeker_attempt([heads[i] for i in todo], [requests[i] for i in todo])):
                out[i] = judgment
            todo = [i for i in todo if out[i].error]
            if not todo:
                break
        return out

    def _seeker_attempt(self, heads: list[str], requests) -> list[Judgment]:
        temperature = requests[0].temperature if requests[0].temperature >= 0 else self.temperature
        prefixes = [h + SEEKER_PREFIX for h in heads]
        reasons = self._lines(prefixes, self.max_reason_tokens, temperature)
        prefixes = [f"{p} {r}\nChange:" for p, r in zip(prefixes, reasons)]
        changes = self._lines(prefixes, 4, temperature, number=True)
        prefixes = [f"{p} {c}\n" for p, c in zip(prefixes, changes)]
        labels = self._choices(prefixes, ("Message", "Goodbye"), sep="")
        prefixes = [f"{p}{label}:" for p, label in zip(prefixes, labels)]
        out = []
        for reason, change, label, words in zip(reasons, changes, labels, self._generate(prefixes, requests)):
            kept = []
            for line in words.splitlines():
                if SEEKER_LINE.match(line.strip()):
                    break
                kept.append(line)
            text = f"{SEEKER_PREFIX} {reason}\nChange: {change}\n{label}: " + "\n".join(kept).strip()
            reply = parse_seeker(text) if label else None
            out.append(Judgment(float(reply.change), text) if reply else
                       Judgment(None, text, error="reply out of the seeker protocol"))
        return out

    @torch.no_grad()
    def _lines(self, prefixes: list[str], budget: int, temperature: float, number: bool = False) -> list[str]:
        """One sampled line after each prefix, cut at its first line break; `number`: written only
        with a sign and digits that can still become a whole number within MAX_CHANGE."""
        out = []
        for start in range(0, len(prefixes), self.batch_size):
            chunk = prefixes[start:start + self.batch_size]
            enc = self.tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            width = enc["input_ids"].shape[1]
            self._check_length(width + budget)
            self.stats.prompt_tokens += int(enc["attention_mask"].sum())
            enc = {k: v.to(self.device) for k, v in enc.items()}
            sampling = {"temperature": temperature, "top_p": self.top_p} if temperature > 0 else \
                {"temperature": None, "top_p": None}
            if number:
                sampling["prefix_allowed_tokens_fn"] = self._number_tokens(width)
            gen = self.model.generate(**enc, max_new_tokens=budget, do_sample=temperature > 0, top_k=None,
                                      pad_token_id=self.tok.pad_token_id, stop_strings=["\n"], tokenizer=self.tok,
                                      **sampling)
            self.stats.calls += len(chunk)
            for row in gen[:, width:]:
                self.stats.completion_tokens += int((row != self.tok.pad_token_id).sum())
                out.append(self.tok.decode(row, skip_special_tokens=True).split("\n")[0].strip())
        return out

    def _number_tokens(self, width: int):
        """For `generate`: the tokens that keep a row's text after position `width` on its way to a
        whole number within MAX_CHANGE (an optional sign, one or two digits), and a line break once
        it is one."""
        if self._numbers is None:
            texts = self.tok.batch_decode([[i] for i in range(len(self.tok))])
            self._numbers = {i: t for i, t in enumerate(texts)
                             if re.fullmatch(r" ?[+-]?\d{0,2}|\n+", t) and t.strip(" ")}
        whole = {f"{sign}{n}" for sign in ("", "+", "-") for n in range(MAX_CHANGE + 1)}
        begun = {w[:k] for w in whole for k in range(1, len(w) + 1)}
        done = [self.tok.pad_token_id]

        def allowed(_, ids) -> list[int]:
            text = self.tok.decode(ids[width:], skip_special_tokens=True)
            if "\n" in text:
                return done                             # finished: generate pads the rest
            digits = [i for i, t in self._numbers.items()
                      if "\n" not in t and (text + t).strip() in begun and not (text and t.startswith(" "))]
            breaks = [i for i, t in self._numbers.items() if "\n" in t] if text.strip() in whole else []
            return digits + breaks or done
        return allowed

    def _safety_checks(self, heads: list[str], requests) -> list[Judgment]:
        """Each safety check answered on its own line, yes or no, whichever is likelier, the earlier
        answers written in; in reasoned mode after a short sampled reason (cut at its own first check
        line)."""
        reasons = [""] * len(heads)
        if self.mode == "reasoned":
            first = re.compile(rf"^\W*(?:{'|'.join(SAFETY_CHECKS)})\W*[:：]", re.IGNORECASE)
            reasons = ["\n".join(next((lines[:k] for k, line in enumerate(lines) if first.match(line)), lines)).strip()
                       for lines in (r.splitlines() for r in self._generate(heads, [None] * len(heads)))]
        texts = [f"{r}\n" if r else "" for r in reasons]
        for check in SAFETY_CHECKS:
            answers = self._choices([h + t + f"{check}:" for h, t in zip(heads, texts)], ("yes", "no"))
            texts = [f"{t}{check}: {a}\n" for t, a in zip(texts, answers)]
        out = []
        for text in texts:
            checks = parse_safety(text)
            out.append(safety_judgment(checks, text.strip()) if checks else
                       Judgment(None, text.strip(), error="no finite probability on yes / no"))
        return out


def _cache_length(cache) -> int:
    """Positions held by a KV cache: a transformers Cache, or the legacy tuple of (keys, values) per layer."""
    return cache.get_seq_length() if hasattr(cache, "get_seq_length") else int(cache[0][0].shape[-2])


def request_budget(tok, cases: list[dict], mode: str, perspectives, answer_tokens: int, max_reason_tokens: int) -> int:
    """The longest judge request the reward sends for these cases, in tokens: rubric and case around
    an answer of `answer_tokens`, the reason in reasoned mode, and the score. A model that judges
    through Unsloth must be loaded with at least this `max_seq_length` (04 loads its shared judge so)."""
    from perm.models import chat_length
    from perm.protocol import build_requests
    longest = 0
    for case in cases:
        for r in build_requests(case, "", "", mode, perspectives, bystander=True, bystander_by_criteria=True):
            longest = max(longest, chat_length(tok, r.chat(), add_generation_prompt=True))
    score = len(tok(f"{SCORE_PREFIX} 5", add_special_tokens=False)["input_ids"])
    return longest + answer_tokens + (max_reason_tokens if mode == "reasoned" else 0) + score

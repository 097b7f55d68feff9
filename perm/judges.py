"""PERM judges: rendering, the output protocol and its parser, a local and an API backend, the cache.

A request is one judgment: a perspective, the rendered chat messages, and what kind of score it asks
for (`likert` 1-5, `bystander` five 0-20 sub-scores and a 0-100 total, or `criterion` one bystander
criterion on 1-5). Both backends return a `Judgment`; a failed one has `score=None` and is counted,
never replaced by a mean. Only successes are cached, so a re-run retries failures.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from perm.prompts import render

PERSPECTIVES = ("resonation", "expression", "reception")                 # PERM: the Empathy Cycle
BYSTANDER_CRITERIA = ("Content effectiveness", "Logical clarity", "Communication efficiency",
                      "Objectivity", "Accuracy")                          # PERM: the bystander
DIGITS = "12345"

# The output protocol (CONVENTIONS.md), defined once for the prompts and the parser.
REASONED_LIKERT = ("Write two or three sentences of reasoning, then end with a last line of exactly this form, "
                   "with N from 1 to 5:\nScore: N")
DIRECT_LIKERT = "Reply with one line only, of exactly this form, with N from 1 to 5:\nScore: N"
REASONED_BYSTANDER = ("Write two or three sentences of reasoning. Then score each criterion from 0 to 20 on its "
                      "own line, and end with the total from 0 to 100 as the last line:\n"
                      + "\n".join(f"- {c}: N / 20" for c in BYSTANDER_CRITERIA) + "\nTotal Score: N / 100")
DIRECT_CRITERION = ("Judge only this criterion: {criterion}. Reply with one line only, of exactly this form, "
                    "with N from 1 (very poor) to 5 (excellent):\nScore: N")
REASONED_CRITERION = ("Judge only this criterion: {criterion}. Write one or two sentences of reasoning, then end "
                      "with a last line of exactly this form, with N from 1 (very poor) to 5 (excellent):\nScore: N")
SCORE_PREFIX = "Score:"
# Blind pairwise preference (evaluation): the verdict is the last line.
PREFERENCE_PREFIX = "Preference:"
PREFERENCE_OPTIONS = ("A", "B", "tie")
REASONED_PREFERENCE = ("Write two or three sentences comparing them, then end with a last line of exactly this form, "
                       "with X being A, B or tie:\nPreference: X")
DIRECT_PREFERENCE = "Reply with one line only, of exactly this form, with X being A, B or tie:\nPreference: X"

_SCORE_LINE = re.compile(r"^[*_ ]*score[*_ ]*[:：][*_ ]*([1-5])(?:\.0+)?[*_ ]*(?:/[*_ ]*5)?[*_ .]*$", re.IGNORECASE)
_TOTAL_LINE = re.compile(r"^[*_ ]*total[ _]score[*_ ]*[:：][*_ ]*(\d{1,3})[*_ ]*(?:/[*_ ]*100)?[*_ .]*$", re.IGNORECASE)
_SUB_LINE = re.compile(r"^[-*• ]*[*_ ]*([a-z ]+?)[*_ ]*[:：][*_ ]*(\d{1,2})[*_ ]*(?:/[*_ ]*20)?[*_ .]*$", re.IGNORECASE)


# ---------------------------------------------------------------- protocol parsing

def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def parse_likert(text: str) -> int | None:
    """The 1-5 score of the judge's own last line `Score: N`; anything else is None.

    Only the final non-empty line counts, so a `Score: 5` quoted from the candidate earlier in the
    reply can never become the score."""
    m = _SCORE_LINE.match(_last_line(text))
    return int(m.group(1)) if m else None


_PREFERENCE_LINE = re.compile(r"^[*_ ]*preference[*_ ]*[:：][*_ ]*(a|b|tie)[*_ .]*$", re.IGNORECASE)


def parse_preference(text: str) -> str | None:
    """'A', 'B' or 'tie' from the judge's own last line `Preference: X`; anything else is None."""
    m = _PREFERENCE_LINE.match(_last_line(text))
    return {"a": "A", "b": "B", "tie": "tie"}[m.group(1).lower()] if m else None


def preference_request(case: dict, answer_a: str, answer_b: str, mode: str) -> Request:
    """One blind comparison; the score of its Judgment is +1 (A), -1 (B) or 0 (tie)."""
    messages = render("judge_pairwise", persona=case["persona"], scenario=case["scenario"], query=case["query"],
                      answer_a=_escape(answer_a, "answer_a"), answer_b=_escape(answer_b, "answer_b"),
                      output_instructions=DIRECT_PREFERENCE if mode == "direct" else REASONED_PREFERENCE)
    return Request("pairwise", "choice", _freeze(messages))


PREFERENCE_SCORE = {"A": 1.0, "B": -1.0, "tie": 0.0}


def _escape(text: str, tag: str) -> str:
    return re.sub(rf"</?\s*{tag}\s*>", lambda m: m.group(0).replace("<", "‹").replace(">", "›"), text,
                  flags=re.IGNORECASE)


def parse_bystander(text: str) -> tuple[float, dict] | None:
    """(total 0-100, {criterion: 0-20}) from the judge's last lines, or None."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    total = _TOTAL_LINE.match(lines[-1])
    if not total or int(total.group(1)) > 100:
        return None
    subs = {}
    for line in lines[-1 - len(BYSTANDER_CRITERIA):-1]:
        m = _SUB_LINE.match(line)
        if m and int(m.group(2)) <= 20:
            name = next((c for c in BYSTANDER_CRITERIA if c.lower() == m.group(1).strip().lower()), None)
            if name:
                subs[name] = float(m.group(2))
    if len(subs) != len(BYSTANDER_CRITERIA):
        return None
    return float(total.group(1)), subs


def expected_digit(probs: dict[str, float]) -> float | None:
    """Expectation over the digits 1-5, renormalized; None when no mass falls on them."""
    mass = sum(probs.get(d, 0.0) for d in DIGITS)
    if mass <= 0:
        return None
    return sum(int(d) * probs.get(d, 0.0) for d in DIGITS) / mass


# ---------------------------------------------------------------- requests

@dataclass(frozen=True)
class Request:
    perspective: str      # resonation | expression | reception | bystander | writer
    kind: str             # likert | bystander | criterion | text (free text: synthesis, teacher answers)
    messages: tuple       # ((role, content), ...)
    max_tokens: int = 0           # text: the reply budget
    temperature: float = -1.0     # text: sampling temperature; -1 = the judge's JUDGE_TEMPERATURE

    def chat(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class Judgment:
    score: float | None                 # 1-5 (likert, criterion) or 0-100 (bystander); None for text
    text: str = ""
    subscores: dict = field(default_factory=dict)
    error: str = ""                     # non-empty = failed (counted, never cached)
    cached: bool = False


def escape_candidate(text: str) -> str:
    """Keep candidate text from closing its own delimiter."""
    return _escape(text, "candidate")


def build_requests(case: dict, analysis: str, response: str, mode: str, perspectives=PERSPECTIVES,
                   bystander: bool = True, reception_sees_hidden_need: bool = False,
                   bystander_by_criteria: bool = False) -> list[Request]:
    """The judge requests for one formatted answer, in a fixed order.

    The bystander is one request for the paper's sub-scores and total, or (`bystander_by_criteria`:
    direct mode, and always on a local judge) one 1-5 request per criterion."""
    base = {"persona": case["persona"], "scenario": case["scenario"], "query": case["query"]}
    likert = DIRECT_LIKERT if mode == "direct" else REASONED_LIKERT
    out = []
    for p in perspectives:
        values = dict(base, candidate=escape_candidate(analysis if p == "resonation" else response),
                      output_instructions=likert)
        if p == "reception":
            need = case.get("hidden_need") or ""
            values["hidden_need_note"] = (f"\n(What I hope for but have not said: {need})\n"
                                          if reception_sees_hidden_need and need else "")
        out.append(Request(p, "likert", _freeze(render(f"judge_{p}", **values))))
    if bystander:
        values = dict(base, candidate=escape_candidate(response))
        if bystander_by_criteria or mode == "direct":
            template = DIRECT_CRITERION if mode == "direct" else REASONED_CRITERION
            for criterion in BYSTANDER_CRITERIA:
                msgs = render("judge_bystander", **values, output_instructions=template.format(criterion=criterion))
                out.append(Request("bystander", "criterion", _freeze(msgs)))
        else:
            msgs = render("judge_bystander", **values, output_instructions=REASONED_BYSTANDER)
            out.append(Request("bystander", "bystander", _freeze(msgs)))
    return out


def _freeze(messages: list[dict]) -> tuple:
    return tuple((m["role"], m["content"]) for m in messages)


def text_request(messages: list[dict], max_tokens: int, temperature: float, role: str = "writer") -> Request:
    """A free-text request (a synthesized case, a first message, a teacher's answer)."""
    return Request(role, "text", _freeze(messages), max_tokens, temperature)


def criterion_to_points(score: float) -> float:
    """A 1-5 criterion rating mapped linearly to the paper's 0-20 sub-score (direct mode)."""
    return (score - 1.0) / 4.0 * 20.0


# ---------------------------------------------------------------- cache

class JudgeCache:
    """SQLite cache of successful judgments. WAL mode and one commit per write make it safe for a
    killed run and for two processes sharing the file."""

    def __init__(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        for attempt in range(20):   # two processes opening a new cache at once may briefly see it locked
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                                "created REAL NOT NULL)")
                self.db.commit()
                break
            except sqlite3.OperationalError:
                if attempt == 19:
                    raise
                time.sleep(0.05 * (attempt + 1))
        self.db.execute("PRAGMA synchronous=NORMAL")   # WAL: survives a killed process, no fsync per write

    def get(self, key: str) -> Judgment | None:
        with self._lock:
            row = self.db.execute("SELECT value FROM judgments WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        value = json.loads(row[0])
        return Judgment(score=value["score"], text=value["text"], subscores=value.get("subscores", {}), cached=True)

    def put(self, key: str, judgment: Judgment) -> None:
        if judgment.error:
            return
        value = json.dumps({"score": judgment.score, "text": judgment.text, "subscores": judgment.subscores})
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO judgments VALUES (?, ?, ?)", (key, value, time.time()))
            self.db.commit()


def folder_fingerprint(path: str) -> str:
    """Content hash of a model folder (file names and bytes), so a rebuilt model never reuses
    judgments cached for another; a hub id is its own identity."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- judges

@dataclass
class JudgeStats:
    calls: int = 0          # requests actually sent (API attempts, local generations/forwards)
    failures: int = 0       # judgments that failed after every retry
    retries: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    judgments: int = 0

    def as_metrics(self, prefix: str = "") -> dict:
        return {f"{prefix}judge_calls": self.calls, f"{prefix}judge_failures": self.failures,
                f"{prefix}judge_retries": self.retries, f"{prefix}cache_hits": self.cache_hits,
                f"{prefix}prompt_tokens": self.prompt_tokens, f"{prefix}completion_tokens": self.completion_tokens,
                f"{prefix}judgments": self.judgments}


class Judge:
    """Cache + dedupe in front of a backend. `judge(requests)` returns one Judgment per request."""

    def __init__(self, backend, cache: JudgeCache | None, identity: dict):
        self.backend, self.cache, self.identity = backend, cache, identity
        self.stats = backend.stats

    def key(self, request: Request) -> str:
        payload = json.dumps({**self.identity, "kind": request.kind, "messages": request.messages,
                              "max_tokens": request.max_tokens, "temperature": request.temperature}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def judge(self, requests: list[Request]) -> list[Judgment]:
        keys = [self.key(r) for r in requests]
        results: dict[str, Judgment] = {}
        todo: dict[str, Request] = {}
        for key, request in zip(keys, requests):
            if key in results or key in todo:
                continue                                   # identical judgments are sent once
            hit = self.cache.get(key) if self.cache else None
            if hit is not None:
                self.stats.cache_hits += 1
                results[key] = hit
            else:
                todo[key] = request
        if todo:
            todo_keys = list(todo)

            def store(index: int, judgment: Judgment) -> None:  # as each one arrives: a killed run keeps it
                if self.cache and not judgment.error:
                    self.cache.put(todo_keys[index], judgment)

            for key, judgment in zip(todo_keys, self.backend.judge(list(todo.values()), store)):
                self.stats.failures += bool(judgment.error)
                results[key] = judgment
        self.stats.judgments += len(requests)
        return [results[k] for k in keys]


def judge_from_settings(s: dict, prefix: str = "JUDGE", mode: str = "", model: str = "", **kwargs) -> "Judge":
    """make_judge from a stage's JUDGE* settings (or EVAL_JUDGE* with prefix="EVAL_JUDGE"). `mode` and
    `model` override the settings (a writer always runs in direct mode; 04 may judge with the policy)."""
    def get(key):
        return s[f"{prefix}_{key}"]
    return make_judge(s[prefix], model or get("MODEL"), s["RUNS_DIR"], mode or get("MODE"), get("TEMPERATURE"),
                      get("BASE_URL"), get("CONCURRENCY"), get("BATCH_SIZE"), get("TIMEOUT"), get("RETRIES"),
                      get("CACHE"), **kwargs)


def make_judge(backend: str, model: str, runs_dir, mode: str, temperature: float, base_url: str = "",
               concurrency: int = 16, batch_size: int = 8, timeout: float = 60.0, retries: int = 3,
               cache_path: str = "", max_reason_tokens: int = 96, local_model=None, context=None) -> Judge:
    """A cached judge from the JUDGE* settings. `local_model` reuses an already loaded (model, tok)
    of `model`; `context` wraps its judging (e.g. a policy's disable_adapter)."""
    if backend == "local":
        from perm import USE_UNSLOTH
        from perm.local_judge import LocalBackend
        from perm.models import resolve_model
        path = resolve_model(model, runs_dir)
        impl = LocalBackend(path, mode, temperature, batch_size, max_reason_tokens, local_model, context)
        identity = {"backend": "local", "model": folder_fingerprint(path), "mode": mode,
                    "4bit": bool(local_model and USE_UNSLOTH),
                    "temperature": temperature if mode == "reasoned" else 0.0, "max_reason_tokens": max_reason_tokens}
    elif backend == "api":
        impl = ApiBackend(model, base_url, mode, temperature, concurrency, timeout, retries)
        identity = {"backend": "api", "base_url": base_url, "model": model, "mode": mode, "temperature": temperature}
    else:
        raise SystemExit(f"error: JUDGE={backend!r}; choose local or api")
    cache = JudgeCache(cache_path or Path(runs_dir) / "judge_cache.sqlite")
    return Judge(impl, cache, identity)


# ---------------------------------------------------------------- API backend

class ApiBackend:
    """Any OpenAI-compatible endpoint. The client never retries by itself (max_retries=0): retries,
    backoff (honouring Retry-After), timeouts and failures are counted here."""
    bystander_by_criteria = False

    def __init__(self, model: str, base_url: str, mode: str, temperature: float, concurrency: int,
                 timeout: float, retries: int):
        self.model, self.base_url, self.mode, self.temperature = model, base_url or None, mode, temperature
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self.stats = JudgeStats()
        self.api_key = os.environ.get("JUDGE_API_KEY")
        if not self.api_key:
            print("[judge] JUDGE_API_KEY is not set: sending a placeholder key (fine for a keyless local server)")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client = None

    def judge(self, requests: list[Request], on_done=None) -> list[Judgment]:
        return asyncio.run_coroutine_threadsafe(self._judge_all(requests, on_done), self._loop).result()

    async def _judge_all(self, requests, on_done):
        if self._client is None:  # created inside the loop that uses it
            from openai import AsyncOpenAI
            self._client = AsyncOpenAI(api_key=self.api_key or "placeholder", base_url=self.base_url,
                                       timeout=self.timeout, max_retries=0)
            self._sem = asyncio.Semaphore(self.concurrency)
        async def one(index, request):
            judgment = await self._judge_one(request)
            if on_done:
                on_done(index, judgment)
            return judgment

        return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))

    async def _judge_one(self, request: Request) -> Judgment:
        import openai
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
            delay = None
            async with self._sem:
                self.stats.calls += 1
                try:
                    reply = await asyncio.wait_for(self._client.chat.completions.create(
                        model=self.model, messages=request.chat(), **self._sampling(request)), timeout=self.timeout)
                except (asyncio.TimeoutError, openai.APITimeoutError):
                    error = f"timeout after {self.timeout}s"
                except openai.APIStatusError as e:
                    error = f"HTTP {e.status_code}"
                    retry_after = e.response.headers.get("retry-after") if e.response is not None else None
                    if retry_after:
                        try:
                            delay = float(retry_after)
                        except ValueError:
                            delay = None
                    if e.status_code in (400, 401, 403, 404) and not retry_after:
                        break                                    # a request error: retrying cannot help
                except openai.APIConnectionError as e:
                    error = f"connection error: {e}"
                else:
                    judgment = self._read(request, reply)
                    if not judgment.error:
                        return judgment
                    error = judgment.error
            await asyncio.sleep(delay if delay is not None else min(8.0, 0.25 * 2 ** attempt) * (0.5 + random.random()))
        return Judgment(score=None, error=error)

    def _sampling(self, request: Request) -> dict:
        if request.kind == "text":
            return {"max_tokens": request.max_tokens,
                    "temperature": request.temperature if request.temperature >= 0 else self.temperature}
        scored = {"temperature": self.temperature, "logprobs": request.kind != "choice"}
        scored |= {"top_logprobs": 10} if scored["logprobs"] else {}
        return scored | {"max_tokens": 400 if request.kind == "bystander" or self.mode == "reasoned" else 8}

    def _read(self, request: Request, reply) -> Judgment:
        if reply.usage:
            self.stats.prompt_tokens += reply.usage.prompt_tokens or 0
            self.stats.completion_tokens += reply.usage.completion_tokens or 0
        choice = reply.choices[0]
        text = choice.message.content or ""
        if request.kind == "text":
            return Judgment(None, text.strip(), error="" if text.strip() else "empty reply")
        if request.kind == "bystander":
            parsed = parse_bystander(text)
            if parsed is None:
                return Judgment(None, text, error="no bystander protocol lines")
            return Judgment(parsed[0], text, subscores=parsed[1])
        if request.kind == "choice":
            verdict = parse_preference(text)
            if verdict is None:
                return Judgment(None, text, error="no final 'Preference: X' line")
            return Judgment(PREFERENCE_SCORE[verdict], text)
        digit = parse_likert(text)
        if digit is None:
            return Judgment(None, text, error="no final 'Score: N' line")
        score = _logprob_expectation(choice) or float(digit)
        return Judgment(score, text)


def _logprob_expectation(choice) -> float | None:
    """Expected score from the top logprobs at the final digit token, when the endpoint returns them."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    for token in reversed(content):
        if token.token.strip() in DIGITS and token.token.strip():
            probs = {}
            for alt in token.top_logprobs or []:
                d = alt.token.strip()
                if d in DIGITS and len(d) == 1:
                    probs[d] = probs.get(d, 0.0) + math.exp(alt.logprob)
            return expected_digit(probs)
    return None

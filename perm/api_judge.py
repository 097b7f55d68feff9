"""The API judge backend: any OpenAI-compatible endpoint (OpenAI, DeepSeek, vLLM, Ollama).

Requests run concurrently (at most JUDGE_CONCURRENCY in flight) on an event loop of the backend's
own thread, so callers stay synchronous. The openai client never retries by itself: retries with
jittered backoff (honouring Retry-After), per-attempt timeouts and failures are counted here. An
endpoint that refuses logprobs is said once and read by the written digit from then on (metric
`judge_logprobs_rejected`). The key comes from the environment variable JUDGE_API_KEY only.
"""
from __future__ import annotations

import asyncio
import math
import os
import random
import re
import threading

from perm.protocol import (DIGITS, PREFERENCE_SCORE, Judgment, JudgeStats, Request, expected_digit, parse_bystander,
                           parse_likert, parse_preference, parse_safety, parse_seeker, safety_judgment)

REASONED_MAX_TOKENS = 1024   # a reason, then the score (paper: max_tokens 1024)
DIRECT_MAX_TOKENS = 8        # the score line only
DIRECT_SAFETY_MAX_TOKENS = 32   # the four safety lines only


class ApiBackend:
    """Any OpenAI-compatible endpoint. The client never retries by itself (max_retries=0): retries,
    backoff (honouring Retry-After), timeouts and failures are counted here."""
    bystander_by_criteria = False

    def __init__(self, model: str, base_url: str, mode: str, temperature: float, concurrency: int,
                 timeout: float, retries: int, top_p: float = 1.0, *, score: str):
        self.model, self.base_url, self.mode, self.temperature = model, base_url or None, mode, temperature
        self.top_p, self.score = top_p, score   # score: JUDGE_SCORE, expected (logprobs) or sampled (the digit)
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
                try:
                    reply = await self._send(request)
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

    async def _send(self, request: Request):
        """One attempt. An endpoint that rejects logprobs (some models, servers and providers do) is
        noted once and the request sent again without them, within the same attempt: the rejection is
        the endpoint's, not a failed judgment."""
        import openai
        while True:
            sampling = self._sampling(request)
            self.stats.calls += 1
            try:
                return await asyncio.wait_for(self._client.chat.completions.create(
                    model=self.model, messages=request.chat(), **sampling), timeout=self.timeout)
            except openai.APIStatusError as e:
                if not (sampling.get("logprobs") and rejects_logprobs(e)):
                    raise
                if not self.stats.logprobs_rejected:
                    self.stats.logprobs_rejected = True
                    print(f"[judge] {self.base_url or 'the OpenAI API'} rejects logprobs for {self.model} "
                          f"(HTTP {e.status_code}: {e.message[:300]}): scores are the written digit from now on, as "
                          f"with JUDGE_SCORE=sampled (metric judge_logprobs_rejected)")

    def _sampling(self, request: Request) -> dict:
        if request.kind in ("text", "seeker"):
            return {"max_tokens": request.max_tokens,
                    "temperature": request.temperature if request.temperature >= 0 else self.temperature}
        logprobs = (request.kind not in ("choice", "safety") and self.score == "expected"
                    and not self.stats.logprobs_rejected)
        scored = {"temperature": self.temperature, "top_p": self.top_p, "logprobs": logprobs}
        scored |= {"top_logprobs": 10} if scored["logprobs"] else {}
        reasoned = request.kind == "bystander" or self.mode == "reasoned"
        direct = DIRECT_SAFETY_MAX_TOKENS if request.kind == "safety" else DIRECT_MAX_TOKENS
        return scored | {"max_tokens": REASONED_MAX_TOKENS if reasoned else direct}

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
        if request.kind == "seeker":                    # out of protocol: failed, so retried
            reply = parse_seeker(text)
            return Judgment(float(reply.change), text.strip()) if reply else \
                Judgment(None, text, error="reply out of the seeker protocol")
        if request.kind == "safety":
            checks = parse_safety(text)
            return safety_judgment(checks, text) if checks else Judgment(None, text, error="no final four safety lines")
        digit = parse_likert(text)
        if digit is None:
            return Judgment(None, text, error="no final 'Score: N' line")
        score = (self.score == "expected" and _logprob_expectation(choice)) or float(digit)
        return Judgment(score, text)


def rejects_logprobs(error) -> bool:
    """Whether an HTTP error refuses the request's logprobs: a 400 (422 on some servers) whose
    message or parameter names them, as OpenAI ("'logprobs' is not supported with this model",
    param "logprobs"), vLLM ("Requested sample logprobs of 10, which is greater than max allowed")
    and Gemini's endpoint ("Logprobs is not enabled for models/...") answer."""
    return error.status_code in (400, 422) and "logprob" in f"{error.message} {error.param or ''}".lower()


def _logprob_expectation(choice) -> float | None:
    """Expected score from the top logprobs at the digit of the reply's final `Score: N` line (never
    at a digit elsewhere: `Score: 2/5` reads the 2), when the endpoint returns logprobs."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    text = "".join(t.token for t in content)
    lines = [m for m in re.finditer(r"[^\n]+", text) if m.group(0).strip()]
    if not lines:
        return None
    digit = re.search(r"score[*_ ]*[:：][*_ ]*([1-5])", lines[-1].group(0), re.IGNORECASE)
    if digit is None:
        return None
    at, position = lines[-1].start() + digit.start(1), 0
    for token in content:
        if position <= at < position + len(token.token):
            if token.token.strip() != digit.group(1):
                return None                   # the digit shares a token with other text: no clean reading
            probs = {}
            for alt in token.top_logprobs or []:
                d = alt.token.strip()
                if len(d) == 1 and d in DIGITS:
                    probs[d] = probs.get(d, 0.0) + math.exp(alt.logprob)
            return expected_digit(probs)
        position += len(token.token)
    return None

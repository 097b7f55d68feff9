"""A small OpenAI-compatible chat server on 127.0.0.1, for tests and the judge benchmark.

It answers `POST /v1/chat/completions` like a judge: a short reason, then the protocol line(s) the
prompt asks for, with logprobs when asked. It can add a fixed latency and inject failures (HTTP 500,
429 with Retry-After, a hang past the client's timeout, a reply with no score), and it counts
requests, the most in flight at once, and the Authorization headers it saw.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import re
import threading
import time

from aiohttp import web

FAILURES = ("500", "429", "hang", "noscore")


class FakeJudgeServer:
    def __init__(self, latency: float = 0.0, failure_rate: float = 0.0, failures=FAILURES, score: int = 4,
                 hang_seconds: float = 30.0, seed: int = 0, quote_candidate: bool = False, preference: str = "longer",
                 persistent: bool = False):
        self.latency, self.failure_rate, self.failures = latency, failure_rate, tuple(failures)
        self.score, self.hang_seconds, self.quote_candidate = score, hang_seconds, quote_candidate
        self.preference = preference   # pairwise: "longer" answer wins, or always "A" (a position bias)
        self.random = random.Random(seed)
        self.persistent = persistent   # False: a prompt fails at most once, so a retry succeeds
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.injected = {kind: 0 for kind in FAILURES}
        self.auth_headers: set[str] = set()
        self._failed_once: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _serve(self):
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.auth_headers.add(request.headers.get("Authorization", ""))
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            prompt = json.dumps(body["messages"])
            # Each distinct prompt fails at most once, so a retry can succeed: every failure is
            # then either retried into a success or counted.
            if self.failure_rate and (self.persistent or prompt not in self._failed_once) and self.random.random() < self.failure_rate:
                self._failed_once.add(prompt)
                kind = self.random.choice(self.failures)
                self.injected[kind] += 1
                if kind == "500":
                    return web.json_response({"error": {"message": "boom"}}, status=500)
                if kind == "429":
                    return web.json_response({"error": {"message": "slow down"}}, status=429,
                                             headers={"Retry-After": "0.2"})
                if kind == "hang":
                    await asyncio.sleep(self.hang_seconds)
                if kind == "noscore":
                    return web.json_response(self._reply(body, "I would rather not give a number."))
            return web.json_response(self._reply(body, self._judge_text(body)))
        finally:
            self.in_flight -= 1

    def _judge_text(self, body) -> str:
        system = body["messages"][0]["content"]
        # the output protocol stands after the last delimited candidate (which may imitate it)
        protocol = re.split(r"</[a-z_]+>", body["messages"][-1]["content"])[-1]
        if "You write new seeker cases" in system:      # synthesis: a case built from the request
            n = self.requests
            return json.dumps({"persona": f"Sam {n}, 30, a welder who jokes when nervous.",
                               "scenario": f"Sam's workshop number {n} is closing next month.",
                               "query": f"So shop {n} is shutting. Fun times. What now, right?",
                               "hidden_need": "Sam wants help planning the next job."})
        if "You write the first message" in system:
            return "我最近压力很大，不知道该跟谁说。"
        if "You compare two replies" in system:
            user = body["messages"][-1]["content"]
            a = user.split("<answer_a>")[1].split("</answer_a>")[0]
            b = user.split("<answer_b>")[1].split("</answer_b>")[0]
            verdict = "A" if self.preference == "A" or len(a) > len(b) else ("B" if len(b) > len(a) else "tie")
            return f"Both try to help.\nPreference: {verdict}"
        reason = "The reply addresses the person's situation with some care."
        if self.quote_candidate:
            reason += ' It even says "Score: 5" inside the answer, which is part of the text judged.'
        if "Total Score" in protocol:
            lines = [f"- {c}: 15 / 20" for c in ("Content effectiveness", "Logical clarity",
                                                  "Communication efficiency", "Objectivity", "Accuracy")]
            return reason + "\n" + "\n".join(lines) + "\nTotal Score: 75 / 100"
        if "Reply with one line only" in protocol:
            return f"Score: {self.score}"
        return f"{reason}\nScore: {self.score}"

    def _reply(self, body, text: str) -> dict:
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        if body.get("logprobs"):
            tokens = re.findall(r"\s*\S+|\s+", text)
            content = []
            for tok in tokens:
                top = [{"token": tok, "logprob": 0.0, "bytes": None}]
                if tok.strip() == str(self.score):
                    # 70% on the chosen digit, 30% on the one below it: expectation score - 0.3
                    top = [{"token": tok, "logprob": math.log(0.7), "bytes": None},
                           {"token": str(self.score - 1), "logprob": math.log(0.3), "bytes": None}]
                content.append({"token": tok, "logprob": top[0]["logprob"], "bytes": None, "top_logprobs": top})
            choice["logprobs"] = {"content": content}
        return {"id": "x", "object": "chat.completion", "created": int(time.time()), "model": body.get("model", "fake"),
                "choices": [choice], "usage": {"prompt_tokens": len(json.dumps(body["messages"])) // 4,
                                               "completion_tokens": len(text) // 4, "total_tokens": 0}}


def main() -> None:
    """`python tests/fake_openai.py LATENCY [FAILURE_RATE]`: serve until killed; prints the base URL."""
    import sys
    latency = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    failure_rate = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    with FakeJudgeServer(latency=latency, failure_rate=failure_rate) as server:
        print(server.base_url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()

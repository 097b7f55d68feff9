"""Throughput of the API judge's whole per-call path against a local server with a fixed latency.

What it measures: `Judge.judge(requests)` from `perm.judges.make_judge("api", ...)`, i.e. cache-key
hashing, the SQLite cache lookup and store, the HTTP request through AsyncOpenAI and the parsing of
the reply, against `tests/fake_openai.py` (run as a separate process, so it does not share this GIL),
which answers every request after exactly `--latency` seconds. For each concurrency C it sends
N = C * per_slot distinct judgments (real cases from data/cases.jsonl, each answer made unique by a
counter, so nothing is a cache hit) and reports throughput N / elapsed as a ratio to the ideal
C / latency. Prompt rendering (`build_requests`) is timed separately and reported beside it.

Two baselines send the same N chat requests at the same concurrency, for context: a plain
`AsyncOpenAI(max_retries=0)` loop under an asyncio.Semaphore (no cache, no parsing), and a
`ThreadPoolExecutor(max_workers=C)` of stdlib `urllib.request` POSTs. A last pass repeats the
highest concurrency's requests on the same judge: every one must be a cache hit (0 requests sent).
Each method first sends C unmeasured warm-up requests (client creation, connections, threads).

Run from the repository root:
    PYTHONPATH=. python bench/judge_throughput.py [--latency 0.5] [--concurrency 8,16,32,64]
        [--per-slot 8] [--mode direct|reasoned] [--json PATH]
It prints a markdown table; nothing is written in the repository unless --json PATH is given.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from perm.judges import make_judge  # noqa: E402
from perm.protocol import build_requests  # noqa: E402
from perm.prompts import split_sections  # noqa: E402

MODEL = "fake-judge"
KEY = "placeholder"  # the fake server accepts any key


def start_server(latency: float):
    """`python tests/fake_openai.py LATENCY` in its own process; returns (process, base_url)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_openai.py"), str(latency)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise SystemExit(f"fake server did not start (first line: {url!r})")
    return proc, url


def load_cases() -> list[dict]:
    with open(REPO / "data" / "cases.jsonl") as f:
        cases = [json.loads(line) for line in f if line.strip()]
    for case in cases:  # the reference answer gives realistic candidate text
        case["analysis"], case["response"] = split_sections(case["reference"]) or ("Analysis.", "Response.")
    return cases


def make_requests(cases, n: int, mode: str, tag: str) -> list:
    """n distinct judge requests: answers made unique by a counter, 8 (direct) or 4 requests each."""
    out, i = [], 0
    while len(out) < n:
        case = cases[i % len(cases)]
        out += build_requests(case, f"{case['analysis']} [{tag}-{i}]", f"{case['response']} [{tag}-{i}]", mode)
        i += 1
    return out[:n]


def payload(request, mode: str) -> dict:
    """The body ApiBackend sends for this request."""
    return {"model": MODEL, "messages": request.chat(), "temperature": 0.0,
            "max_tokens": 400 if request.kind == "bystander" or mode == "reasoned" else 8,
            "logprobs": True, "top_logprobs": 10}


def stats_delta(after, before) -> dict:
    return {f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(after)}


async def plain_openai(url: str, warm: list[dict], bodies: list[dict], concurrency: int) -> float:
    from openai import AsyncOpenAI
    client = AsyncOpenAI(api_key=KEY, base_url=url, max_retries=0, timeout=60)
    sem = asyncio.Semaphore(concurrency)

    async def one(body):
        async with sem:
            await client.chat.completions.create(**body)

    await asyncio.gather(*(one(b) for b in warm))
    start = time.perf_counter()
    await asyncio.gather(*(one(b) for b in bodies))
    elapsed = time.perf_counter() - start
    await client.close()
    return elapsed


def thread_pool(url: str, warm: list[dict], bodies: list[dict], concurrency: int) -> float:
    def post(body):
        req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=60) as reply:
            reply.read()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(post, warm))
        start = time.perf_counter()
        list(pool.map(post, bodies))
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency", type=float, default=0.5, help="server latency per request, seconds")
    ap.add_argument("--concurrency", default="8,16,32,64", help="comma-separated concurrencies")
    ap.add_argument("--per-slot", type=int, default=8, help="judgments per concurrency slot (N = C * per_slot)")
    ap.add_argument("--mode", choices=("direct", "reasoned"), default="direct")
    ap.add_argument("--json", help="also write the results to this path")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    os.environ.setdefault("JUDGE_API_KEY", KEY)  # silences the placeholder-key notice
    cases = load_cases()
    rows, cached = [], {}
    proc, url = start_server(args.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for c in levels:
                n, ideal = c * args.per_slot, c / args.latency
                t = time.perf_counter()
                requests = make_requests(cases, n, args.mode, f"c{c}")
                build_s = time.perf_counter() - t
                warm = make_requests(cases, c, args.mode, f"warm{c}")
                judge = make_judge(backend="api", model=MODEL, runs_dir=tmp, mode=args.mode, temperature=0.0, top_p=1.0,
                                   score="expected", base_url=url, concurrency=c, batch_size=1, timeout=60.0, retries=3,
                                   cache_path=f"{tmp}/cache-{c}.sqlite", load_in_4bit=None)
                judge.judge(warm)
                before = dataclasses.replace(judge.stats)
                t = time.perf_counter()
                judgments = judge.judge(requests)
                judge_s = time.perf_counter() - t
                stats = stats_delta(judge.stats, before)
                assert all(j.score is not None for j in judgments), "some judgments failed"
                bodies, warm_bodies = [payload(r, args.mode) for r in requests], [payload(r, args.mode) for r in warm]
                openai_s = asyncio.run(plain_openai(url, warm_bodies, bodies, c))
                threads_s = thread_pool(url, warm_bodies, bodies, c)
                rows.append({"concurrency": c, "n": n, "ideal_per_s": ideal, "build_s": build_s,
                             "judge_s": judge_s, "judge_per_s": n / judge_s, "judge_ratio": n / judge_s / ideal,
                             "openai_per_s": n / openai_s, "openai_ratio": n / openai_s / ideal,
                             "threads_per_s": n / threads_s, "threads_ratio": n / threads_s / ideal,
                             "judge_stats": stats})
                if c == max(levels):  # cached second pass: identical requests, same judge and cache
                    before = dataclasses.replace(judge.stats)
                    t = time.perf_counter()
                    judge.judge(requests)
                    cached = {"concurrency": c, "n": n, "elapsed_s": time.perf_counter() - t,
                              **{k: v for k, v in stats_delta(judge.stats, before).items()
                                 if k in ("calls", "cache_hits", "failures")}}
                judge.cache.db.close()
    finally:
        proc.kill()
        proc.wait()

    print(f"\nlatency {args.latency}s, mode {args.mode}, N = concurrency x {args.per_slot}\n")
    print("| concurrency | ideal/s | judge/s | ratio | plain AsyncOpenAI ratio | thread pool ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['ideal_per_s']:.1f} | {r['judge_per_s']:.1f} | {r['judge_ratio']:.3f} "
              f"| {r['openai_ratio']:.3f} | {r['threads_ratio']:.3f} |")
    print()
    for r in rows:
        s = r["judge_stats"]
        print(f"C={r['concurrency']}: N={r['n']} judge {r['judge_s']:.2f}s (calls {s['calls']}, failures "
              f"{s['failures']}, retries {s['retries']}, cache_hits {s['cache_hits']}); "
              f"build_requests {r['build_s'] * 1000:.0f} ms")
    if cached:
        print(f"cached pass C={cached['concurrency']}: N={cached['n']} in {cached['elapsed_s'] * 1000:.0f} ms, "
              f"calls {cached['calls']}, cache_hits {cached['cache_hits']}, failures {cached['failures']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"latency": args.latency, "mode": args.mode, "per_slot": args.per_slot,
                                               "rows": rows, "cached_pass": cached}, indent=2))


if __name__ == "__main__":
    main()

"""The judge front: a SQLite cache and de-duplication in front of a backend, and the factory that
builds a judge from a stage's JUDGE* (or 05's EVAL_JUDGE*) settings.

A judgment's cache key covers the backend, the model's identity, the precision it runs in, the
mode, how a score is read (JUDGE_SCORE), the sampling settings and the rendered messages: a changed
rubric, model or setting never reuses an old judgment, and an unchanged one is never paid for twice. Only successes are stored,
each as it arrives, so a killed run keeps what it paid for and a re-run retries the failures.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from perm.protocol import SCORE_MODES, Judgment, Request

PROGRESS_FROM = 16      # judgments to send before a progress bar is worth showing

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


# ---------------------------------------------------------------- judges

class Judge:
    """Cache + dedupe in front of a backend. `judge(requests)` returns one Judgment per request."""

    def __init__(self, backend, cache: JudgeCache | None, identity: dict):
        self.backend, self.cache, self.identity = backend, cache, identity
        self.stats = backend.stats
        self.progress, self.progress_label = True, "judging"   # a bar (count, rate, time left) for long batches

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
            bar = tqdm(total=len(todo), desc=self.progress_label, unit="judgment", leave=False,
                       disable=not self.progress or len(todo) < PROGRESS_FROM)

            def store(index: int, judgment: Judgment) -> None:  # as each one arrives: a killed run keeps it
                if self.cache and not judgment.error:
                    self.cache.put(todo_keys[index], judgment)
                bar.update(1)

            # a local judge answers a whole call at once: feed it in chunks so the bar moves
            chunk = 8 * self.backend.batch_size if hasattr(self.backend, "batch_size") else len(todo)
            requests_todo = list(todo.values())
            with bar:
                for start in range(0, len(todo), chunk):
                    done = self.backend.judge(requests_todo[start:start + chunk],
                                              lambda i, j, start=start: store(start + i, j))
                    for key, judgment in zip(todo_keys[start:start + chunk], done):
                        self.stats.failures += bool(judgment.error)
                        results[key] = judgment
        self.stats.judgments += len(requests)
        return [results[k] for k in keys]


# ---------------------------------------------------------------- model identity

def model_identity(path: str) -> str:
    """A model folder's identity for the cache: file names, sizes and modification times, plus the
    content of its config files and the safetensors headers (which name every tensor with its
    shape and dtype). A rebuilt or retrained model changes it; reading it costs a few kilobytes,
    not the weights. A hub id is its own identity."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(folder).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        if file.suffix == ".json" and stat.st_size < 1 << 20:
            digest.update(file.read_bytes())
        elif file.suffix == ".safetensors":
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(size, 1 << 24)))
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- the factory

REASON_TOKENS = 96            # a local judge's reason in reasoned mode: two or three sentences

JUDGE_ARGUMENTS = {"backend": "", "model": "_MODEL", "base_url": "_BASE_URL", "mode": "_MODE",
                   "temperature": "_TEMPERATURE", "top_p": "_TOP_P", "score": "_SCORE", "concurrency": "_CONCURRENCY",
                   "batch_size": "_BATCH_SIZE", "timeout": "_TIMEOUT", "retries": "_RETRIES", "cache_path": "_CACHE"}


def judge_from_settings(s, prefix: str = "JUDGE", **overrides) -> "Judge":
    """A cached judge from a stage's JUDGE* settings (or EVAL_JUDGE* with prefix="EVAL_JUDGE").
    `overrides` replace settings by argument name (`mode="direct"`: a writer never reasons first);
    the stage's constants are the only defaults."""
    kwargs = {arg: s[prefix + suffix] for arg, suffix in JUDGE_ARGUMENTS.items() if prefix + suffix in s}
    kwargs["load_in_4bit"] = s.get("LOAD_IN_4BIT")     # the stage's LOAD_IN_4BIT (01 has none: 4-bit with CUDA)
    return make_judge(runs_dir=s["RUNS_DIR"], **{**kwargs, **overrides})


def make_judge(*, backend: str, model: str, runs_dir, mode: str, temperature: float, top_p: float, score: str,
               base_url: str, concurrency: int, batch_size: int, timeout: float, retries: int, cache_path: str,
               load_in_4bit: bool | None, max_reason_tokens: int = REASON_TOKENS, local_model=None) -> Judge:
    """A cached judge. `local_model` reuses an already loaded (model, tokenizer) of `model` (04's
    policy with its adapters switched off while judging), with `local_model[0]`'s precision; else a
    local judge loads per `load_in_4bit` (LOAD_IN_4BIT) the way 04 loads its policy
    (`perm.models.load_judge_model`). Its identity names the checkpoint actually loaded and the
    loader: Unsloth maps a hub id to its own 4-bit checkpoint, another model under the same name.
    `score` (JUDGE_SCORE): `expected`, the expectation over the digits' probabilities, or `sampled`,
    the digit the judge writes (the paper's)."""
    if score not in SCORE_MODES:
        raise SystemExit(f"error: JUDGE_SCORE={score!r}; choose {' or '.join(SCORE_MODES)}")
    if backend == "local":
        from perm.local_judge import LocalBackend
        from perm.models import loaded_checkpoint, model_precision, resolve_model
        path = resolve_model(model, runs_dir)
        impl = LocalBackend(path, mode, temperature, batch_size, max_reason_tokens, local_model, top_p=top_p,
                            score=score, load_in_4bit=load_in_4bit, retries=retries)
        sampling = mode == "reasoned" or score == "sampled"    # direct + expected samples nothing
        identity = {"backend": "local", "model": model_identity(loaded_checkpoint(impl.model) or path),
                    "loader": impl.loader, "mode": mode, "score": score, "precision": model_precision(impl.model),
                    "temperature": temperature if sampling else 0.0,
                    "top_p": top_p if sampling else 1.0, "max_reason_tokens": max_reason_tokens}
    elif backend == "api":
        if not model:
            raise SystemExit("error: JUDGE=api needs JUDGE_MODEL (the model name the server knows, e.g. gpt-4o-mini)")
        from perm.api_judge import ApiBackend
        impl = ApiBackend(model, base_url, mode, temperature, concurrency, timeout, retries, top_p=top_p, score=score)
        identity = {"backend": "api", "base_url": base_url, "model": model, "mode": mode, "score": score,
                    "temperature": temperature, "top_p": top_p}
    else:
        raise SystemExit(f"error: JUDGE={backend!r}; choose local or api")
    cache = JudgeCache(cache_path or Path(runs_dir) / "judge_cache.sqlite")
    return Judge(impl, cache, identity)

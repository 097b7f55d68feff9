"""Serve a base model with a trained LoRA adapter through an OpenAI-compatible API (for EQ-Bench3).

    python tools/serve.py ADAPTER=runs/grpo/default NAME=perm PORT=8000
    # then, in EQ-Bench3's folder (TEST_API_URL must be the full path):
    #   TEST_API_URL=http://localhost:8000/v1/chat/completions TEST_API_KEY=none \
    #   python eqbench3.py --test-model perm --model-name perm-grpo --judge-model anthropic/claude-3.7-sonnet \
    #       --ignore-canonical

With vLLM installed and a GPU it runs `vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER`
(fast, batched). Otherwise it serves with transformers + PEFT in this process: `POST
/v1/chat/completions` (no streaming) and `GET /v1/models`; slow, but enough for a check on any machine.
The base model comes from the run's config.json unless MODEL is set. Messages are passed through as
they come: EQ-Bench's own prompts set its answer format, not PERM's two sections.
"""
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perm.settings import configure  # noqa: E402

RUNS_DIR = "runs"
TAG = "default"
SEED = 1234
SMOKE = False
PRESET = "auto"
ADAPTER = "runs/grpo/default"  # a runs/sft|grpo/<tag> folder or an adapter folder; "" = the base alone
MODEL = ""                     # base model; "" = the one recorded in the run's config.json
NAME = "perm"                  # the model name clients ask for
HOST = "127.0.0.1"
PORT = 8000
BACKEND = "auto"               # auto (vllm when importable and CUDA is there) | vllm | transformers
MAX_NEW_TOKENS = 1024          # cap per request

settings = configure(globals())


def adapter_and_base():
    folder = Path(ADAPTER) if ADAPTER else None
    adapter = None
    if folder is not None:
        adapter = folder / "adapter" if (folder / "adapter" / "adapter_config.json").exists() else folder
        if not (adapter / "adapter_config.json").exists():
            sys.exit(f"error: no LoRA adapter in {folder}; run 02_sft.py or 04_grpo.py first")
    base = MODEL
    if not base:
        config = folder / "config.json" if folder is not None else None
        if config is None or not config.exists():
            sys.exit("error: set MODEL (no run config.json to read the base model from)")
        base = json.loads(config.read_text())["settings"]["MODEL"]
    return base, (str(adapter) if adapter else None)


def serve_transformers(base: str, adapter: str | None):
    from aiohttp import web
    from perm.generation import sample_answers
    from perm.models import load_model
    model, tok = load_model(base, RUNS_DIR, adapter=adapter, load_in_4bit=None)   # 4-bit with CUDA
    lock = asyncio.Lock()

    async def chat(request):
        body = await request.json()
        max_tokens = min(int(body.get("max_tokens") or body.get("max_completion_tokens") or MAX_NEW_TOKENS),
                         MAX_NEW_TOKENS)
        temperature = float(body.get("temperature", 0.7))
        async with lock:   # one generation at a time on this path
            [[answer]] = await asyncio.to_thread(sample_answers, model, tok, [body["messages"]], 1, max_tokens,
                                                 temperature, 1, SEED)
        return web.json_response({
            "id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
            "model": NAME, "choices": [{"index": 0, "message": {"role": "assistant", "content": answer["text"]},
                                        "finish_reason": "length" if answer["truncated"] else "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": answer["completion_tokens"], "total_tokens": 0}})

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": NAME, "object": "model"}]})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    print(f"[serve] {NAME} = {base}" + (f" + {adapter}" if adapter else "") + f" at http://{HOST}:{PORT}/v1",
          flush=True)
    web.run_app(app, host=HOST, port=PORT, print=None)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_command(base: str, adapter: str | None) -> list[str]:
    """`vllm serve` for the base (an alias resolved to its folder) plus the adapter. vLLM caps LoRA
    ranks at 16 unless told otherwise, so the adapter's own rank is passed."""
    from perm.models import resolve_model
    path = resolve_model(base, RUNS_DIR)
    command = ["vllm", "serve", path, "--host", HOST, "--port", str(PORT), "--served-model-name", base]
    if adapter:
        rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
        allowed = next(r for r in VLLM_LORA_RANKS if r >= rank)          # vLLM accepts only these
        command += ["--enable-lora", "--lora-modules", f"{NAME}={adapter}", "--max-lora-rank", str(allowed)]
    return command


def main():
    base, adapter = adapter_and_base()
    use_vllm = BACKEND == "vllm" or (BACKEND == "auto" and shutil.which("vllm") is not None
                                     and __import__("torch").cuda.is_available())
    if use_vllm:
        command = vllm_command(base, adapter)
        print("[serve] " + " ".join(command), flush=True)
        os.execvp(command[0], command)
    serve_transformers(base, adapter)   # on the GPU in 4-bit where there is one (perm.models.load_model)


if __name__ == "__main__":
    main()

"""tools/serve.py: a base model plus a LoRA adapter behind an OpenAI-compatible API."""
import socket
import subprocess
import sys
import time

from conftest import REPO


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_base_plus_adapter_for_openai_clients(runs_dir, tmp_path):
    from openai import OpenAI
    from peft import LoraConfig, get_peft_model
    from perm.models import load_model
    model, tok = load_model("tiny", runs_dir, load_in_4bit=None)
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(adapter)
    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "tools" / "serve.py"), f"RUNS_DIR={runs_dir}",
                               f"ADAPTER={adapter}", "MODEL=tiny", f"PORT={port}", "BACKEND=transformers",
                               "MAX_NEW_TOKENS=16"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        deadline = time.time() + 300
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["perm"]
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        reply = client.chat.completions.create(model="perm", max_tokens=8, temperature=0.7,
                                               messages=[{"role": "user", "content": "I failed my exam."}])
        assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.terminate()
        server.wait(10)

"""The two offline models behind the aliases."""
import json

import pytest

from conftest import REPO
from perm.models import load_model
from perm.prompts import policy_prompt, split_sections


def sample(model, tok, cases, max_new_tokens):
    texts = [tok.apply_chat_template(policy_prompt(c), add_generation_prompt=True, tokenize=False) for c in cases]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0)
    return [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True) for o in out]


@pytest.fixture(scope="module")
def cases():
    rows = [json.loads(line) for line in (REPO / "data" / "cases.jsonl").read_text().splitlines()]
    return rows[3::10]


def test_tiny_model_writes_both_sections(runs_dir, cases):
    import torch
    torch.manual_seed(0)
    model, tok = load_model("tiny", runs_dir, load_in_4bit=None)
    answers = sample(model, tok, cases, max_new_tokens=64)
    formatted = sum(split_sections(a) is not None for a in answers)
    assert formatted >= len(answers) // 2, answers  # smoke runs see both formatted and failed answers
    assert (runs_dir / "models" / "tiny" / "config.json").exists()


@pytest.mark.slow
def test_demo_model_loads_from_the_installed_wheel_and_generates(runs_dir, cases):
    model, tok = load_model("smollm2-135m", runs_dir, load_in_4bit=None)
    assert model.config.model_type == "llama" and 130e6 < model.num_parameters() < 140e6
    answers = sample(model, tok, cases[:2], max_new_tokens=24)
    assert all(len(a.split()) >= 5 for a in answers), answers
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)


def test_chat_length_counts_tokens_for_the_length_filters(runs_dir):
    """02 drops examples over MAX_SEQ_LENGTH and 04 prompts over MAX_PROMPT_TOKENS by this count."""
    from perm.models import chat_length, load_tokenizer, resolve_model
    tok = load_tokenizer(resolve_model("tiny", runs_dir))
    messages = [{"role": "user", "content": "I failed my driving test again and my dad laughed."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat_length(tok, messages, add_generation_prompt=True) == len(tok(text, add_special_tokens=False)["input_ids"])
    assert chat_length(tok, messages * 20) > 20 * chat_length(tok, messages) // 2 > 2

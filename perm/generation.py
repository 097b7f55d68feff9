"""Sampling answers from a policy: batched, left-padded, stopping at end of turn, in inference state."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from perm.models import inference_state


@torch.no_grad()
def sample_answers(model, tok, prompts: list[list[dict]], n: int, max_new_tokens: int, temperature: float,
                   batch_size: int = 8, seed: int = 0) -> list[list[dict]]:
    """For each chat prompt, `n` answers as dicts: text, completion_tokens, truncated (no end of
    turn within max_new_tokens)."""
    torch.manual_seed(seed)
    eos = {tok.eos_token_id} | ({tok.convert_tokens_to_ids("<|im_end|>")} if "<|im_end|>" in tok.get_vocab() else set())
    flat = [p for p in prompts for _ in range(n)]
    texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in flat]
    out = []
    with inference_state(model), tqdm(total=len(texts), desc="sampling", unit="answer", leave=False,
                                      disable=len(texts) <= batch_size) as bar:
        for batch in _batches(model, tok, texts, batch_size, max_new_tokens, temperature, eos):
            out += batch
            bar.update(len(batch))
    return [out[k * n:(k + 1) * n] for k in range(len(prompts))]


def _batches(model, tok, texts, batch_size, max_new_tokens, temperature, eos):
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                             eos_token_id=sorted(eos), pad_token_id=tok.pad_token_id)
        batch = []
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            ended = next((k for k, t in enumerate(row) if t in eos), None)
            ids = row[:ended] if ended is not None else row
            batch.append({"text": tok.decode(ids, skip_special_tokens=True).strip(),
                          "completion_tokens": len(ids) + (ended is not None), "truncated": ended is None})
        yield batch

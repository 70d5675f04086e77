"""Helpers the per-method test files share: a fixed batch, the head's parameter count,
a seeded perturbation of the trainable weights, logits in eval mode."""

from __future__ import annotations

from typing import Optional

import torch

from engine.arch import head_modules

TEXTS = ["the film was wonderful and moving", "dull", "what is the capital of france", "two plus two"]


def fixed_batch(tok, task: str, texts: Optional[list[str]] = None, special: bool = True,
                labels: Optional[list[int]] = None) -> dict:
    """Four short texts (or `texts`), padded; classification labels `labels` (default
    alternating 1, 0), causal LM labels = the ids with padding masked."""
    texts = texts or TEXTS
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=special)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if task == "classification":
        batch["labels"] = torch.tensor(labels if labels is not None else [1 - i % 2 for i in range(len(texts))])
    else:
        ids = enc["input_ids"].clone()
        ids[enc["attention_mask"] == 0] = -100
        batch["labels"] = ids
    return batch


def head_count(model, task: str) -> int:
    if task != "classification":
        return 0
    return sum(p.numel() for _, h in head_modules(model) for p in h.parameters())


@torch.no_grad()
def perturb_trainable(model, scale: float = 0.3, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * scale)


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def assert_cached_greedy_matches_uncached(prep, max_new_tokens: int = 4) -> None:
    """Greedy `generate` (with the KV cache) on a left-padded batch equals the same greedy
    steps taken by full forward passes without a cache: the method's modules see the cache
    and the positions right."""
    model = prep.model
    perturb_trainable(model, scale=1.0)
    model.eval()
    enc = prep.tokenizer(["the capital of france is", "hi"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=prep.tokenizer.pad_token_id)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        for _ in range(out.shape[1] - ids.shape[1]):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert torch.equal(out, ids)

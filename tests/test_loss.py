"""The chunked cross-entropy equals the plain one, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine.loss as T


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_chunked_loss_matches_plain_cross_entropy(monkeypatch, train_head, chunk):
    monkeypatch.setattr(T, "LOSS_CHUNK", chunk)
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    head.weight.requires_grad_(train_head)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100                        # prompt tokens are not scored
    ours = T.chunked_causal_loss(hidden, head, labels)
    ours.backward()
    g_ours = hidden.grad.clone()
    w_ours = head.weight.grad.clone() if train_head else None
    hidden.grad = None
    head.weight.grad = None
    ref = F.cross_entropy(head(hidden[:, :-1]).reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, hidden.grad)
    if train_head:
        torch.testing.assert_close(w_ours, head.weight.grad)

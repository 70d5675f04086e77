"""The training loss: the chunked next-token cross-entropy (the logits of LOSS_CHUNK
tokens at a time, never all of them, with the gradients made in the same pass),
the classification loss, and TaskLoss, the one module DDP/FSDP wrap. The estimator
reads LOSS_CHUNK to size the loss's transient logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fused, kernels
from .arch import output_head
from .gemm import matmul, matmul_t
from .generation import next_token_logits

LOSS_CHUNK = 1024   # tokens per chunk of the chunked cross-entropy
# Set by engine.measure: called with each chunk's fp32 logits, the loss's largest transient tensor.
observe_loss_chunk = None


def causal_backbone(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, lm_head) of a causal LM, for the chunked loss; the head applies what
    the family's forward does to its logits (engine.arch.output_head)."""
    return model.get_decoder(), output_head(model)


def xent_sum_and_grad_(logits: torch.Tensor, target: torch.Tensor, scale: float, grad: bool) -> torch.Tensor:
    """Summed cross-entropy of one chunk of fp32 logits; with `grad`, the logits are
    overwritten by (softmax - onehot) * scale. One fused pass per row on CUDA
    (engine.kernels, Triton) and on CPU (engine.fused), else log-sum-exp and softmax
    in place with torch ops: one chunk-sized buffer either way (torch.logsumexp makes
    its own shifted copies)."""
    if kernels.applies(logits) and logits.is_contiguous():
        return kernels.ops().softmax_xent_(logits, target, scale, grad).sum()
    if fused.applies(logits) and logits.is_contiguous():
        return fused.softmax_xent_(logits, target, scale, grad).sum()
    picked = logits.gather(1, target[:, None]).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    e = logits.sub_(top).exp_()
    sums = e.sum(dim=-1, keepdim=True)
    loss = (top.squeeze(1) + sums.log().squeeze(1) - picked).sum()
    if grad:
        e.div_(sums / scale)
        e[torch.arange(e.shape[0], device=e.device), target] -= scale
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy of `h @ weight.T` without keeping the logits:
    each chunk's logits are made, turned into the loss and into the gradients for h
    (and for the weight, when it trains) right away, and dropped. Backward only
    scales the stored gradients, so nothing is recomputed."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk):
        n = y.numel()
        w = weight.to(h.dtype)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, n, chunk):
            hc, yc = h[i:i + chunk], y[i:i + chunk]
            logits = matmul_t(hc, w).float()
            if observe_loss_chunk is not None:
                observe_loss_chunk(logits)
            want_grad = grad_h is not None or grad_w is not None
            total += xent_sum_and_grad_(logits, yc, 1.0 / n, want_grad)
            if want_grad:
                p = logits                                            # (softmax - onehot) / n
                if grad_h is not None:
                    grad_h[i:i + chunk] = matmul(p.to(w.dtype), w).to(h.dtype)
                if grad_w is not None:
                    grad_w += p.t() @ hc.float()
                del p
            # free this chunk's logits before the next chunk's are made: otherwise both are
            # live at once and a 2-chunk sequence peaks ~1.5 chunks higher
            del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * g.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * g).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def chunked_causal_loss(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy without materializing all fp32 logits: LOSS_CHUNK
    tokens at a time, with gradients computed in the same pass (no recompute)."""
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    if not bool(keep.all()):
        h, y = h[keep], y[keep]
    if y.numel() == 0:
        return hidden.sum() * 0.0
    if isinstance(lm_head, nn.Linear) and lm_head.bias is None:
        return _LinearCrossEntropy.apply(h, lm_head.weight, y, LOSS_CHUNK)
    total = hidden.new_zeros((), dtype=torch.float32)     # heads with a bias or wrappers: recompute per chunk

    def piece(hc, yc):
        return F.cross_entropy(lm_head(hc).float(), yc, reduction="sum")

    for i in range(0, y.numel(), LOSS_CHUNK):
        hc, yc = h[i:i + LOSS_CHUNK], y[i:i + LOSS_CHUNK]
        total = total + (checkpoint(piece, hc, yc, use_reentrant=False) if torch.is_grad_enabled() else piece(hc, yc))
    return total / y.numel()


def compute_loss(model: nn.Module, batch: dict, task: str) -> torch.Tensor:
    if task == "classification":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(out.logits.float(), batch["labels"])
    decoder, head = causal_backbone(model)
    if "position_ids" in batch:   # packed rows: the model masks attention per example from the position ids
        hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         use_cache=False).last_hidden_state
    else:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
    return chunked_causal_loss(hidden, head, batch["labels"])


class TaskLoss(nn.Module):
    """The model's task loss as one module, so that DDP and FSDP see every forward
    (the chunked loss calls the decoder and the head directly). forward(batch) gives
    (mean task loss, the method's extra loss or None); forward(batch, sums=True), for
    evaluation, gives [loss, correct, count] of the batch: the loss summed over its rows
    (classification) or averaged over its `count` tokens (causal LM); forward(step,
    decode=True), for generation, gives engine.generation.next_token_logits(model, **step)."""

    def __init__(self, model: nn.Module, task: str, extra_loss=None):
        super().__init__()
        self.model, self.task, self.extra_loss = model, task, extra_loss

    def forward(self, batch: dict, sums: bool = False, decode: bool = False):
        if decode:
            return next_token_logits(self.model, **batch)
        if not sums:
            loss = compute_loss(self.model, batch, self.task)
            return loss, (self.extra_loss(self.model) if self.extra_loss is not None else None)
        if self.task == "classification":
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return torch.stack([F.cross_entropy(logits.float(), batch["labels"], reduction="sum"),
                                (logits.argmax(-1) == batch["labels"]).sum().float(),
                                torch.tensor(float(batch["labels"].numel()), device=logits.device)])
        n = (batch["labels"][:, 1:] != -100).sum().float()      # mean over n tokens, not the sum
        return torch.stack([compute_loss(self.model, batch, self.task).float(), n.new_zeros(()), n])

"""Comparing trained LoRA adapters.

Subspace similarity between two LoRA adapters of possibly different rank, as in
Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685),
Sec. 7.2 and Figure 3: with U_A the right-singular vectors of a LoRA `A` matrix
(r x d), the normalized Grassmann similarity

    φ(A1, A2, i, j) = ||U_{A1,i}^T U_{A2,j}||_F^2 / min(i, j)   in [0, 1]

measures how much of the top-i directions of one adapter lie in the top-j
directions of the other (1: one subspace contains the other; two random
subspaces give i*j/d before the normalization). Results are plain data (module
name -> 2D list, rows i = 1..r1, columns j = 1..r2) for the studio to chart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import nn

Source = Union[nn.Module, dict, str, Path]


def top_right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """Rows: the right-singular vectors of `a` (r x d), by decreasing singular value."""
    _, _, vh = torch.linalg.svd(a.detach().double(), full_matrices=False)
    return vh


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor) -> list[list[float]]:
    """φ(a1, a2, i, j) for i = 1..r1 (rows) and j = 1..r2 (columns)."""
    if a1.dim() != 2 or a2.dim() != 2 or a1.shape[1] != a2.shape[1]:
        raise ValueError(f"subspace_similarity: A matrices must be r x d with the same d, "
                         f"got {tuple(a1.shape)} and {tuple(a2.shape)}")
    v1, v2 = top_right_singular_vectors(a1), top_right_singular_vectors(a2)
    overlap = (v1 @ v2.T) ** 2                      # (r1 x r2): squared cosines between directions
    cum = overlap.cumsum(0).cumsum(1)              # cum[i-1, j-1] = ||V1[:i] V2[:j]^T||_F^2
    i = torch.arange(1, cum.shape[0] + 1, dtype=cum.dtype)[:, None]
    j = torch.arange(1, cum.shape[1] + 1, dtype=cum.dtype)[None, :]
    return (cum / torch.minimum(i, j)).clamp(0.0, 1.0).tolist()


def lora_a_matrices(source: Source) -> dict[str, torch.Tensor]:
    """The `A` matrix of every LoRA module, by module name, from a model with LoRA
    layers, a dict of peft-keyed tensors, or an adapter directory
    (adapter_model.safetensors)."""
    if isinstance(source, nn.Module):
        return {n: m.lora_A.weight.detach() for n, m in source.named_modules()
                if isinstance(getattr(m, "lora_A", None), nn.Linear)}
    if isinstance(source, (str, Path)):
        from safetensors.torch import load_file
        source = load_file(str(Path(source) / "adapter_model.safetensors"))
    out = {}
    for key, t in source.items():
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            out[name] = t
    return out


def adapter_subspace_similarity(first: Source, second: Source) -> dict[str, list[list[float]]]:
    """φ for every module the two adapters share: {module: [[φ(i, j) for j] for i]}."""
    a, b = lora_a_matrices(first), lora_a_matrices(second)
    shared = [n for n in a if n in b]
    if not shared:
        raise ValueError("the two adapters share no LoRA module")
    return {n: subspace_similarity(a[n], b[n]) for n in shared}

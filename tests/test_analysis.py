"""Subspace similarity between LoRA adapters (LoRA paper, Figure 3)."""

import pytest
import torch

from engine.analysis import adapter_subspace_similarity, lora_a_matrices, subspace_similarity
from engine.methods import ApplyContext, get_method, parse_method_config
from engine.models import load_model


def test_an_adapter_is_fully_similar_to_itself_on_the_diagonal():
    torch.manual_seed(0)
    a = torch.randn(8, 64)
    phi = subspace_similarity(a, a)
    assert len(phi) == 8 and len(phi[0]) == 8
    for i in range(8):
        assert phi[i][i] == pytest.approx(1.0, abs=1e-9)
    assert all(0.0 <= v <= 1.0 for row in phi for v in row)


def test_random_subspaces_overlap_like_i_times_j_over_d():
    torch.manual_seed(0)
    d, trials = 256, 40
    acc = torch.zeros(8, 16, dtype=torch.float64)
    for _ in range(trials):
        acc += torch.tensor(subspace_similarity(torch.randn(8, d), torch.randn(16, d)), dtype=torch.float64)
    phi = acc / trials
    i = torch.arange(1, 9, dtype=torch.float64)[:, None]
    j = torch.arange(1, 17, dtype=torch.float64)[None, :]
    unnormalized = phi * torch.minimum(i, j)          # ||U_i^T U_j||_F^2
    torch.testing.assert_close(unnormalized, i * j / d, rtol=0.25, atol=0.01)


def test_a_subspace_inside_a_larger_one_scores_one():
    torch.manual_seed(1)
    big = torch.randn(8, 32)
    small = torch.randn(2, 8) @ big                  # rows lie in big's row space
    phi = subspace_similarity(small, big)
    assert phi[1][7] == pytest.approx(1.0, abs=1e-9)


def test_per_module_similarity_of_two_adapters_of_different_rank():
    models = []
    for r in (2, 6):
        m = load_model("tiny-llama", "causal_lm").model
        cfg = parse_method_config({"name": "lora", "r": r})
        get_method("lora").apply(m, cfg, ApplyContext(task="causal_lm", seed=r))
        models.append(m)
    res = adapter_subspace_similarity(models[0], models[1])
    assert set(res) == set(lora_a_matrices(models[0]))
    grid = res["model.layers.0.self_attn.q_proj"]
    assert len(grid) == 2 and len(grid[0]) == 6 and isinstance(grid[0][0], float)


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="same d"):
        subspace_similarity(torch.randn(2, 8), torch.randn(2, 9))

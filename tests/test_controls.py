"""Randomized controls (svd_probe.spectra.controls): what they keep, what they destroy, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svd_probe.spectra import controls as C
from svd_probe.spectra import metrics as M


def planted(rank: int = 6, m: int = 300, n: int = 200, seed: int = 0) -> torch.Tensor:
    # Small noise plus a strong rank-`rank` signal: `rank` spikes above the MP edge.
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(m, rank, generator=g, dtype=torch.float64)
    v = torch.randn(rank, n, generator=g, dtype=torch.float64)
    return (0.1 * torch.randn(m, n, generator=g, dtype=torch.float64) + u @ v).to(torch.float32)


def spikes(w: torch.Tensor) -> int:
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    return M.mp_spikes(s, tuple(w.shape))


@pytest.mark.slow
def test_gaussian_keeps_shape_dtype_and_norm_and_loses_the_signal():
    w = planted()
    assert spikes(w) == 6
    c = C.randomized_copy(w, "gaussian", seed=1)
    assert c.shape == w.shape and c.dtype == w.dtype
    assert torch.linalg.vector_norm(c.double()).item() == pytest.approx(
        torch.linalg.vector_norm(w.double()).item(), rel=1e-6
    )
    # Entries are i.i.d. normal: mean ≈ 0, kurtosis ≈ 3 (60000 draws: standard errors 0.004·s, 0.02).
    x = c.double().flatten()
    sd = x.std().item()
    assert abs(x.mean().item()) < 0.02 * sd
    assert ((x / sd) ** 4).mean().item() == pytest.approx(3.0, abs=0.1)
    assert spikes(c) <= 1
    # BF16 in, BF16 out.
    assert C.randomized_copy(w.to(torch.bfloat16), "gaussian", seed=1).dtype == torch.bfloat16


@pytest.mark.slow
def test_shuffled_keeps_the_entries_and_loses_the_signal():
    w = planted()
    c = C.randomized_copy(w, "shuffled", seed=2)
    assert c.shape == w.shape and c.dtype == w.dtype
    assert torch.equal(torch.sort(c.flatten()).values, torch.sort(w.flatten()).values)
    assert not torch.equal(c, w)
    assert spikes(c) <= 1


@pytest.mark.parametrize("mode", C.CONTROL_MODES)
def test_copies_are_deterministic_from_the_seed(mode):
    w = planted(seed=3)
    a, b = C.randomized_copy(w, mode, seed=7), C.randomized_copy(w, mode, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, C.randomized_copy(w, mode, seed=8))
    assert torch.equal(w, planted(seed=3))  # the input is left alone


def test_control_seed_is_stable_and_per_tensor():
    name = "model.layers.0.self_attn.o_proj.weight"
    # Pinned: a control must be the same copy in every process and every release (Python's `hash`
    # of a str changes with PYTHONHASHSEED, which is why it is not used).
    assert C.control_seed(0, name) == 8337045664883730607
    assert C.control_seed(0, name) != C.control_seed(1, name)
    assert C.control_seed(0, name) != C.control_seed(0, name.replace("o_proj", "q_proj"))
    assert 0 <= C.control_seed(5, name) < 2**63


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="gaussian, shuffled"):
        C.randomized_copy(torch.ones(2, 2), "uniform", seed=0)

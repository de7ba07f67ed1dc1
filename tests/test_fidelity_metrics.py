"""PSNR, SSIM and SR consistency against their formulas and torchmetrics (a test-only peer)."""

import math

import pytest
import torch

from difflab.metrics.fidelity import bicubic_upscale, consistency_error, psnr, ssim


def test_psnr_is_the_formula():
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 in range 2: 10 log10(4 / 0.01) = 26.02 dB
    y[1, :, :2] += 0.2  # MSE 0.02
    assert torch.allclose(psnr(x, y), torch.tensor([10 * math.log10(400), 10 * math.log10(200)], dtype=torch.float64))


def test_ssim_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 28, 28, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 28, 28, generator=g)).clamp(-1, 1)
    ours = ssim(x, y)
    # torchmetrics pads by reflection and averages its SSIM map over the whole image; Wang et al.'s MSSIM (and ours)
    # averages where the window fits inside the image, which is torchmetrics' map without its 5-pixel border.
    _, full = tm.structural_similarity_index_measure(y, x, data_range=2.0, reduction="none", return_full_image=True)
    peer = full[..., 5:-5, 5:-5].flatten(1).mean(1)
    # float64 here against torchmetrics' float32 convolutions: agreement to about 1e-6
    assert torch.allclose(ours.float(), peer, atol=1e-5), (ours, peer)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))


def test_consistency_of_a_perfect_and_a_bicubic_upscale():
    low = torch.rand(2, 1, 7, 7) * 2 - 1
    exact = low.repeat_interleave(2, -1).repeat_interleave(2, -2)  # its 2x2 means are low itself
    assert consistency_error(exact, low).abs().max() < 1e-12
    up = bicubic_upscale(low, 2)
    assert up.shape == (2, 1, 14, 14) and consistency_error(up, low).max() > 0

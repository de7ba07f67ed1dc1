"""Space-to-depth patches, coordinate channels and token pooling of the UNet (issue 12's efficient layout)."""

import pytest
import torch
from torch.nn import functional as F

from difflab.errors import UserError
from difflab.nets.patches import patchify, unpatchify
from difflab.nets.text_base import masked_mean
from difflab.nets.unet import UNet
from difflab.nets.unet_config import UNetConfig


def test_patchify_is_pixel_unshuffle_and_unpatchify_pixel_shuffle():
    """For images, torch's own pixel_unshuffle / pixel_shuffle are the independent truth (channel order c, i, j)."""
    x = torch.randn(2, 3, 8, 12)
    folded = patchify(x, 2, (True, True))
    assert torch.equal(folded, F.pixel_unshuffle(x, 2))
    assert torch.equal(unpatchify(folded, 2, (True, True)), F.pixel_shuffle(folded, 2))


@pytest.mark.parametrize("shape,p,axes", [((2, 1, 16), 4, (True,)), ((2, 3, 4, 8, 8), 2, (False, True, True)),
                                          ((1, 2, 6, 6, 6), 3, (True, True, True))])
def test_patches_round_trip_and_place_pixels(shape, p, axes):
    x = torch.randn(shape)
    folded = patchify(x, p, axes)
    assert torch.equal(unpatchify(folded, p, axes), x)
    if len(shape) == 3:  # a sequence: channel i of position l holds sample l * p + i
        assert torch.equal(folded[:, :, 1], x[:, 0, p:2 * p])


def test_unet_with_patches_and_coordinates_runs_at_full_resolution_and_checks_sizes():
    config = UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), norm_groups=8,
                        patch_size=2, coordinate_channels=True)
    net = UNet(config)
    assert net.conv_in.in_channels == (3 + 2) * 4  # RGB plus (y, x) coordinates, each 2x2 patch folded
    assert net.conv_out.out_channels == 3 * 4
    torch.nn.init.normal_(net.conv_out.weight)  # zero-initialised output would hide a wrong unpatchify
    out = net(torch.randn(2, 3, 16, 12), torch.tensor([3.0, 500.0]))
    assert out.shape == (2, 3, 16, 12)
    with pytest.raises(UserError, match="divisible by 4"):  # patch 2 times one halving
        net(torch.randn(1, 3, 16, 10), 1.0)


def test_coordinates_break_translation_equivariance():
    """Away from the borders a convolutional UNet is translation-equivariant: a square shifted by 4 pixels on a
    blank image gives the shifted output (GroupNorm sees the same pixel values, permuted). With coordinate channels
    the output depends on absolute position, which is what the channels are for."""
    x = torch.zeros(1, 3, 48, 48)
    x[..., 18:21, 18:21] = 1.0
    shifted = torch.zeros_like(x)
    shifted[..., 22:25, 22:25] = 1.0
    gaps = {}
    for coords in (False, True):
        torch.manual_seed(0)
        net = UNet(UNetConfig(base_channels=8, channel_mults=(1,), num_res_blocks=1, attention_levels=(), norm_groups=4,
                              mid_attention=False, coordinate_channels=coords)).eval()
        torch.nn.init.normal_(net.conv_out.weight)
        with torch.no_grad():
            a, b = net(x, 10.0), net(shifted, 10.0)
        gap = (a[..., 16:24, 16:24] - b[..., 20:28, 20:28]).abs().max()
        gaps[coords] = (gap / a.abs().max()).item()
    # relative to the output scale: float32 GroupNorm sums over 2304 pixels in another order give ~1e-6 (measured
    # 3e-6); the coordinates change outputs by a sizeable fraction of their scale
    assert gaps[False] < 1e-4 and gaps[True] > 1e-2, gaps


def test_token_pooling_is_a_masked_mean_and_needs_context():
    tokens = torch.randn(2, 5, 4)
    mask = torch.tensor([[True, True, False, False, False], [True, True, True, True, True]])
    torch.testing.assert_close(masked_mean(tokens, mask), torch.stack([tokens[0, :2].mean(0), tokens[1].mean(0)]))
    net = UNet(UNetConfig(base_channels=16, channel_mults=(1,), attention_levels=(0,), norm_groups=8, context_dim=4,
                          token_pooling=True)).eval()
    torch.nn.init.normal_(net.conv_out.weight)
    x, padded = torch.randn(2, 3, 8, 8), tokens.clone()
    padded[0, 2:] = 100.0  # masked tokens must not matter
    with torch.no_grad():
        torch.testing.assert_close(net(x, 5.0, context=tokens, context_mask=mask),
                                   net(x, 5.0, context=padded, context_mask=mask))
        unmasked = net(x, 5.0, context=padded)
    assert not torch.allclose(unmasked, net(x, 5.0, context=tokens, context_mask=mask))
    with pytest.raises(UserError, match="token_pooling=True needs context"):
        UNetConfig(token_pooling=True)

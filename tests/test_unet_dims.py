"""The UNet on 1-D sequences (B, C, L) and space-time volumes (B, C, T, H, W), and per-axis downsampling."""

import pytest
import torch

from difflab.errors import UserError
from difflab.nets.unet import UNet, UNetConfig

SMALL = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), head_channels=8,
             norm_groups=4)
CASES = {
    "1d": (dict(in_channels=2, dims=1), (2, 2, 32)),
    "3d": (dict(in_channels=3, dims=3, downsample_axes=(False, True, True)), (2, 3, 4, 8, 8)),
}


def _net(kind):
    torch.manual_seed(0)
    net = UNet(UNetConfig(**SMALL, **CASES[kind][0]))
    with torch.no_grad():  # conv_out starts at zero; give it weights so outputs depend on the input and t
        net.conv_out.weight.normal_(0, 0.1)
    return net.eval()


@pytest.mark.parametrize("kind", CASES)
def test_output_has_the_input_shape_and_depends_on_t(kind, one_thread):
    net, shape = _net(kind), CASES[kind][1]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        early, late = net(x, torch.tensor([1.0, 1.0])), net(x, torch.tensor([40.0, 40.0]))
    assert early.shape == x.shape
    assert (early - late).abs().max() > 1e-4


@pytest.mark.parametrize("kind", CASES)
def test_gradients_reach_every_parameter(kind, one_thread):
    net, shape = _net(kind).train(), CASES[kind][1]
    net(torch.randn(shape), torch.tensor([3.0, 7.0])).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("kind", CASES)
def test_round_trip_is_bit_identical(kind, tmp_path, one_thread):
    net, shape = _net(kind), CASES[kind][1]
    net.save_pretrained(tmp_path / kind)
    again = UNet.from_pretrained(tmp_path / kind)
    assert again.config == net.config and again.dims == net.config.dims
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(net(x, 5.0), again(x, 5.0))


def test_time_axis_is_kept_when_not_downsampled(one_thread):
    net = _net("3d")
    x = torch.randn(1, 3, 3, 8, 8)  # T=3 is not a multiple of 2; only H and W are downsampled
    with torch.no_grad():
        assert net(x, 2.0).shape == x.shape
    with pytest.raises(UserError, match="not divisible by 2"):
        net(torch.randn(1, 3, 3, 7, 8), 2.0)
    with pytest.raises(UserError, match=r"expected \(B, 3, T, H, W\)"):
        net(torch.randn(1, 3, 8, 8), 2.0)


def test_bad_dims_are_one_line_errors():
    with pytest.raises(UserError, match="dims=4"):
        UNetConfig(dims=4)
    with pytest.raises(UserError, match="one bool per spatial axis"):
        UNetConfig(dims=3, downsample_axes=(True, True))

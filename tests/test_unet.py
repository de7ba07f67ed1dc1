"""Tests of the difflab UNet and its parts (tiny configs, CPU, fixed seeds)."""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
from torch import nn

from difflab.errors import UserError
from difflab.nets.attention import CrossAttention, SelfAttention
from difflab.nets.embeddings import timestep_embedding
from difflab.nets.unet import UNet
from difflab.nets.unet_config import PRESETS, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py

TINY = dict(
    base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
    norm_groups=8, head_channels=8,
)


def make(seed: int = 0, perturb: bool = True, **overrides) -> UNet:
    """A tiny UNet; ``perturb`` replaces the zero-initialised last conv so the output depends on the input."""
    torch.manual_seed(seed)
    net = UNet(UNetConfig(**{**TINY, **overrides}))
    if perturb:
        nn.init.normal_(net.conv_out.weight, std=0.1)
        nn.init.normal_(net.conv_out.bias, std=0.1)
    return net.eval()


def images(batch: int = 2, size: int = 8, channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_output_shape_and_out_channels() -> None:
    x = images(3)
    assert make()(x, 5.0).shape == (3, 3, 8, 8)
    assert make(out_channels=6)(x, 5.0).shape == (3, 6, 8, 8)
    assert make(channel_mults=(1, 2, 2), num_res_blocks=(1, 2, 1))(images(2, 16), 1.0).shape == (2, 3, 16, 16)


def test_last_conv_zero_init_gives_zero_output() -> None:
    net = make(perturb=False)
    out = net(images(), torch.tensor([0.0, 999.0]))
    assert torch.equal(out, torch.zeros_like(out))


def test_timestep_forms() -> None:
    net, x = make(), images(2)
    scalar = net(x, 7.0)
    assert torch.allclose(net(x, torch.tensor(7.0)), scalar)
    assert torch.allclose(net(x, torch.tensor([7.0, 7.0])), scalar)
    assert torch.allclose(net(x, torch.tensor([7, 7])), scalar)  # integer tensors are accepted
    mixed = net(x, torch.tensor([7.0, 7.5]))  # fractional t
    # float32 forward of the tiny UNet on the same row: seen 0 (batch rows are independent); 1e-6 ~ 10 ulps at |y|~2, slack for kernel reordering.
    assert torch.allclose(mixed[0], scalar[0], atol=1e-6)
    # guard: a 0.5 shift in t moves the output by >= 2.4e-2 here, 240x above the 1e-4 floor (which is ~100 float32 ulps at |y|~2).
    assert not torch.allclose(mixed[1], scalar[1], atol=1e-4)
    with pytest.raises(UserError, match="t has shape"):
        net(x, torch.zeros(3))


def test_timestep_embedding_matches_formula() -> None:
    t = torch.tensor([0.0, 1.5, 999.0])
    emb = timestep_embedding(t, 6)
    for row, tv in enumerate(t.tolist()):
        freqs = [10000.0 ** (-i / 3) for i in range(3)]
        expected = [math.cos(tv * f) for f in freqs] + [math.sin(tv * f) for f in freqs]
        # float32 cos/sin of t*f with |t*f| up to ~1e3: error ~ eps*|t*f| (seen 5.5e-6); 1e-4 = 18x margin.
        assert torch.allclose(emb[row], torch.tensor(expected), atol=1e-4)
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_class_labels_change_output_and_null_label() -> None:
    net, x = make(num_classes=3), images(2)
    a = net(x, 3.0, class_labels=torch.tensor([0, 0]))
    b = net(x, 3.0, class_labels=torch.tensor([1, 1]))
    # guard: different labels change the output by 1.48 (seen), 1e4x above the 1e-4 float32 noise floor.
    assert not torch.allclose(a, b, atol=1e-4)
    assert net.null_label == 3
    null = net(x, 3.0, class_labels=torch.tensor([3, 3]))
    assert torch.allclose(net(x, 3.0), null)  # no labels = the learned null label
    # guard: null vs real label differ by 1.73 (seen), far above the 1e-4 float32 floor.
    assert not torch.allclose(null, a, atol=1e-4)
    with pytest.raises(UserError, match="out of range"):
        net(x, 3.0, class_labels=torch.tensor([0, 4]))
    with pytest.raises(UserError, match="num_classes"):
        make()(x, 3.0, class_labels=torch.tensor([0, 1]))


def test_context_changes_output_and_mask_equals_dropping_tokens() -> None:
    net, x = make(context_dim=12), images(2)
    assert isinstance(net.mid[0].cross, CrossAttention)
    ctx = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3))
    a = net(x, 3.0, context=ctx)
    # guard: swapping contexts moves the output by 0.52 (seen) vs the 1e-4 float32 floor.
    assert not torch.allclose(a, net(x, 3.0, context=ctx.flip(0)), atol=1e-4)
    mask = torch.tensor([[True, True, True, False, False]] * 2)
    masked = net(x, 3.0, context=ctx, context_mask=mask)
    # float32, masking keys vs dropping them: softmax over -inf entries is exact, seen 0; 1e-5 ~ 40 ulps at |y|~2 for reordered reductions.
    assert torch.allclose(masked, net(x, 3.0, context=ctx[:, :3]), atol=1e-5)
    with pytest.raises(UserError, match="every token"):
        net(x, 3.0, context=ctx, context_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(UserError, match="context_dim"):
        make()(x, 3.0, context=ctx)
    assert make().mid[0].cross is None  # no cross-attention without context_dim


def test_pooled_context_changes_output() -> None:
    net, x = make(pooled_context_dim=4), images(2)
    pooled = torch.randn(2, 4, generator=torch.Generator().manual_seed(5))
    a, b = net(x, 3.0, pooled_context=pooled), net(x, 3.0, pooled_context=-pooled)
    # guard: negating pooled context moves the output by 1.53 (seen) vs the 1e-4 float32 floor.
    assert not torch.allclose(a, b, atol=1e-4)


def test_skip_connections_carry_the_input() -> None:
    """With the middle block's output forced to zero, the output still depends on x through the skips."""
    net = make()
    net.mid[1].register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    x = images(1).requires_grad_(True)
    net(x, 3.0).square().sum().backward()
    assert x.grad.abs().sum() > 0
    net.zero_grad()
    net(images(1), 3.0).square().sum().backward()
    assert net.conv_in.weight.grad.abs().sum() > 0


def test_gradients_match_finite_differences() -> None:
    net = make().double()
    x = images(2).double().requires_grad_(True)
    t = torch.tensor([3.0, 700.0], dtype=torch.double)
    assert torch.autograd.gradcheck(lambda inp: net(inp, t), (x,), fast_mode=True)


def test_gradient_checkpointing_gives_same_gradients() -> None:
    x, t = images(2), torch.tensor([3.0, 9.0])
    plain, ckpt = make().train(), make(gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    for net in (plain, ckpt):
        net(x, t).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        # float32, recomputed forward is bit-identical on CPU (seen 0 over 112 params); 1e-6 covers reordered grad accumulation (~0.3 max |grad|, ~30 ulps).
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_bad_resolution_names_size_and_fix() -> None:
    net = make(channel_mults=(1, 2, 2))
    with pytest.raises(UserError, match=r"spatial size 10 .*not divisible by 4.* 8 or 12"):
        net(images(1, 10), 1.0)
    with pytest.raises(UserError, match="expected"):
        net(images(1, 8, channels=1), 1.0)


def test_config_round_trip_and_errors() -> None:
    cfg = UNetConfig(**{**TINY, "num_res_blocks": (1, 2), "num_classes": 4, "context_dim": 8})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["channel_mults"] == [1, 2]
    assert UNetConfig.from_dict(data) == cfg
    with pytest.raises(UserError, match=r"'chanel_mults'.*valid keys are: .*channel_mults"):
        UNetConfig.from_dict({**data, "chanel_mults": [1]})
    with pytest.raises(UserError, match="attention_levels"):
        UNetConfig(channel_mults=(1, 2), attention_levels=(2,))
    with pytest.raises(UserError, match="num_res_blocks"):
        UNetConfig(channel_mults=(1, 2), num_res_blocks=(1, 1, 1))
    with pytest.raises(UserError, match="base_channels"):
        UNetConfig(base_channels=0)


def test_presets_build() -> None:
    assert set(PRESETS) >= {"small32", "tiny32"}
    assert UNetConfig.preset("tiny32", num_classes=3).num_classes == 3
    with pytest.raises(UserError, match="unknown UNet preset"):
        UNetConfig.preset("huge")
    small = UNet(UNetConfig.preset("small32"))
    assert 6.1e6 < sum(p.numel() for p in small.parameters()) < 6.8e6


def test_channels_last_matches_contiguous() -> None:
    net = make(num_classes=2, context_dim=6)
    x, t = images(2), torch.tensor([4.0, 40.0])
    kw = dict(class_labels=torch.tensor([0, 1]), context=torch.randn(2, 3, 6))
    ref = net(x, t, **kw)
    cl_net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    out = cl_net(x.contiguous(memory_format=torch.channels_last), t, **kw)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # float32, channels_last reorders conv reductions (~10^3 MACs per output): seen 1.9e-6; atol 1e-5 + rtol 1e-5*|y| (~3e-5) = ~15x margin.
    assert torch.allclose(out, ref, atol=1e-5)


def test_batch_independence_in_eval() -> None:
    net = make(num_classes=3, dropout=0.3)
    x, t, y = images(4), torch.tensor([1.0, 50.0, 300.5, 999.0]), torch.tensor([0, 1, 2, 3])
    full = net(x, t, class_labels=y)
    for i in range(4):
        alone = net(x[i : i + 1], t[i : i + 1], class_labels=y[i : i + 1])
        # float32, batch-of-1 vs batch-of-4 changes GEMM blocking: seen 2.4e-6; atol+rtol|y| ~3.4e-5 = ~14x margin.
        assert torch.allclose(full[i : i + 1], alone, atol=1e-5)


def test_dropout_only_in_training() -> None:
    net, x = make(dropout=0.5), images(2)
    assert torch.equal(net(x, 3.0), net(x, 3.0))
    net.train()
    # guard: two dropout=0.5 draws differ by 2.17 (seen), far above the 1e-4 float32 floor.
    assert not torch.allclose(net(x, 3.0), net(x, 3.0), atol=1e-4)


def test_self_attention_matches_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(16, head_channels=4, norm_groups=4)
    mha = nn.MultiheadAttention(16, attn.heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.load_state_dict(attn.proj.state_dict())
    x = torch.randn(2, 16, 4, 3)
    tokens = attn.norm(x).flatten(2).transpose(1, 2)
    expected = x + mha(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(x.shape)
    assert attn.heads == 4
    # float32, same math as nn.MultiheadAttention: seen 0; 1e-5 ~ 40 ulps at |y|~3 for a different reduction order.
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_cross_attention_matches_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(16, context_dim=10, head_channels=8, norm_groups=4)
    mha = nn.MultiheadAttention(16, attn.heads, batch_first=True, kdim=10, vdim=10)
    k_w, v_w = attn.to_kv.weight.chunk(2)
    with torch.no_grad():
        mha.q_proj_weight.copy_(attn.to_q.weight)
        mha.k_proj_weight.copy_(k_w)
        mha.v_proj_weight.copy_(v_w)
        mha.in_proj_bias.copy_(torch.cat([attn.to_q.bias, attn.to_kv.bias]))
        mha.out_proj.load_state_dict(attn.proj.state_dict())
    x, ctx = torch.randn(2, 16, 3, 3), torch.randn(2, 5, 10)
    mask = torch.tensor([[True] * 5, [True, False, True, False, False]])
    tokens = attn.norm(x).flatten(2).transpose(1, 2)
    out = mha(tokens, ctx, ctx, key_padding_mask=~mask, need_weights=False)[0]
    expected = x + out.transpose(1, 2).reshape(x.shape)
    # float32 cross-attention vs nn.MultiheadAttention with a padding mask: seen 0; 1e-5 ~ 40 ulps at |y|~3.
    assert torch.allclose(attn(x, ctx, mask), expected, atol=1e-5)


def test_benchmark_script_runs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Smoke test of bench/bench_unet.py at toy sizes (difflab only: building diffusers' model is slow)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_unet.py"
    spec = importlib.util.spec_from_file_location("bench_unet", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_unet", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    args = ["--preset", "tiny32", "--no-diffusers", "--batch", "2", "--iters", "1", "--warmup", "0"]
    bench.main([*args, "--peak-size", "64"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 3  # header, rule, difflab
    assert table[2].startswith("| difflab UNet") and "| 1.162M |" in table[2]

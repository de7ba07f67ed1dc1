"""Guidance wrappers against their formulas and against exact Gaussian-mixture ground truth.

The classifier-guidance checks use the Bayes classifier of a Gaussian mixture: under the VP process
the noised mixture is again a mixture, so p(y = k | x_t) = w_k N_k,t(x_t) / sum_j w_j N_j,t(x_t) is exact
at every t, and grad_x log p(k | x_t) = score_k,t(x_t) - score_t(x_t).
"""

from __future__ import annotations

import math

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.conditioning import drop_conditions, drop_context, drop_mask, pair_conditions
from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.guidance import CFGDenoiser, ClassifierGuidedDenoiser, mean_shift, noise_level
from difflab.process import posterior, v_from_x0_eps
from difflab.samplers import expected_nfe, sample, sampler_names
from difflab.samplers._common import point
from difflab.schedules import NoiseSchedule
from gmm_fixtures import mixture_2d  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
SCHED = NoiseSchedule.linear(1000)
NUM_CLASSES = 5  # the toy's null label is 5


class ToyModel:
    """A deterministic function of (x, t, label) that records the batch size of every call."""

    null_label = NUM_CLASSES

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.labels: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        self.labels.append(class_labels.clone())
        y = class_labels.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        tt = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.sin(x * (1 + 0.3 * y) + 1e-3 * tt) + 0.2 * y - 0.1


def _x(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _branches(param: str, x: torch.Tensor, t: float, cond: torch.Tensor, uncond: torch.Tensor):
    plain = Denoiser(ToyModel(), SCHED, param)
    return plain(x, t, class_labels=cond), plain(x, t, class_labels=uncond)


# ----- classifier-free guidance -------------------------------------------------------------------
@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, 7.0])
def test_cfg_is_the_formula_in_one_batched_call(param: str, w: float) -> None:
    x, t = _x(), 412.5
    labels, null = torch.tensor([0, 3, 1, 4]), torch.full((4,), NUM_CLASSES)
    c, u = _branches(param, x, t, labels, null)
    model = ToyModel()
    cfg = CFGDenoiser(Denoiser(model, SCHED, param), {"class_labels": labels}, {"class_labels": NUM_CLASSES}, w, num_classes=NUM_CLASSES)
    out = cfg(x, t)
    # eps-space guidance; for x0 and v the same weights hold (the maps are affine at fixed t).
    for got, cu, uu in ((out.eps, c.eps, u.eps), (out.x0, c.x0, u.x0), (out.v, c.v, u.v)):
        # float64, |values| <= ~10 after w = 7: a handful of roundings of 1.1e-16 each; seen 7e-15, 1e-12 = 140x.
        torch.testing.assert_close(got, uu + w * (cu - uu), rtol=1e-12, atol=1e-12)
    assert cfg.nfe == 1 and len(model.batches) == 1
    if w == 1.0:  # only the conditional branch runs, and it is the conditional model exactly
        assert model.batches == [4] and torch.equal(out.eps, c.eps) and torch.equal(out.x0, c.x0)
    else:
        assert model.batches == [8]
        assert torch.equal(model.labels[0], torch.cat([labels, null]))
    if w == 0.0 and param == "eps":
        assert torch.equal(out.eps, u.eps) and torch.equal(out.x0, u.x0)


def test_cfg_nfe_under_every_sampler_and_no_change_when_branches_agree() -> None:
    """Every sampler runs unchanged: with cond == uncond the guided samples are the plain ones, same NFE."""
    gmm, noise = mixture_2d(), torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    eps_fn = gmm.eps_model(SCHED)
    for name in sampler_names():
        plain = sample(Denoiser(lambda x, t, class_labels: eps_fn(x, t), SCHED), noise, name, steps=6,
                       generator=torch.Generator().manual_seed(1), cond={"class_labels": torch.zeros(16, dtype=torch.long)})
        cfg = CFGDenoiser(Denoiser(lambda x, t, class_labels: eps_fn(x, t), SCHED), {"class_labels": 1}, {"class_labels": 2}, 4.0)
        guided = sample(cfg, noise, name, steps=6, generator=torch.Generator().manual_seed(1))
        assert guided.nfe == plain.nfe == cfg.nfe, name
        if expected_nfe(name, 6) is not None:
            assert guided.nfe == expected_nfe(name, 6), name
        # cond == uncond: w (eps_c - eps_u) is exactly 0 and each row's float64 mixture eps is computed alone, so the
        # guided run repeats the plain one bit for bit (seen 0 for every sampler).
        torch.testing.assert_close(guided.samples, plain.samples, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("space", ["x0", "eps", "v"])
def test_guidance_rescale_matches_lin_et_al(space: str) -> None:
    """phi = 1 gives the guided prediction the conditional one's per-sample std; phi mixes linearly."""
    x, t, w = _x(), 300.0, 6.0
    labels = torch.tensor([0, 1, 2, 3])
    c, u = _branches("eps", x, t, labels, torch.full((4,), NUM_CLASSES))

    def rep(o):
        return {"x0": o.x0, "eps": o.eps, "v": o.v}[space]

    plain = rep(u) + w * (rep(c) - rep(u))
    std = lambda z: z.flatten(1).std(dim=1).reshape(-1, 1, 1)  # noqa: E731
    for phi in (0.0, 0.7, 1.0):
        cfg = CFGDenoiser(Denoiser(ToyModel(), SCHED), {"class_labels": labels}, None, w, rescale=phi, rescale_space=space)
        got = rep(cfg(x, t))
        expected = phi * plain * std(rep(c)) / std(plain) + (1 - phi) * plain
        # float64 std ratios over 12 entries and the affine x0/eps/v maps: ~10 roundings; seen 5e-15, 1e-12 = 190x.
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        if phi == 1.0:  # float64 std of 12 entries, O(1): seen 2e-16; 1e-12 relative is ample and still tight
            torch.testing.assert_close(std(got), std(rep(c)), rtol=1e-12, atol=1e-14)
        out = cfg(x, t)  # the pair (x0, eps) stays consistent with x_t = alpha x0 + sigma eps
        # float64 round trip x -> (x0, eps) -> x, |x| ~ 3: seen 1.1e-15; 1e-12 = 900x, far below any real slip.
        torch.testing.assert_close(out.alpha * out.x0 + out.sigma * out.eps, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("unit", ["t", "sigma"])
def test_guidance_interval(unit: str) -> None:
    """Inside the interval: guided (one doubled call); outside: the conditional model alone (one plain call)."""
    x, labels, w = _x(), torch.tensor([0, 1, 2, 3]), 3.0
    bounds_t = (200.0, 600.0)
    interval = bounds_t if unit == "t" else tuple(float(noise_level(SCHED, torch.tensor(b))) for b in bounds_t)
    model = ToyModel()
    cfg = CFGDenoiser(Denoiser(model, SCHED), {"class_labels": labels}, None, w, interval=interval, interval_unit=unit)
    for t, inside in ((150.0, False), (200.0 + 1e-6, True), (450.0, True), (599.9, True), (800.0, False)):
        c, u = _branches("eps", x, t, labels, torch.full((4,), NUM_CLASSES))
        model.batches.clear()
        got = cfg(x, t).eps
        # float64, same ops as the hand formula (seen 0): 1e-12 only absorbs reordering, a few ulps of O(1) values.
        torch.testing.assert_close(got, u.eps + w * (c.eps - u.eps) if inside else c.eps, rtol=1e-12, atol=1e-12)
        assert model.batches == ([8] if inside else [4])
    ts = torch.tensor([150.0, 450.0, 800.0, 300.0])  # per-sample times: row-wise selection
    mixed = cfg(x, ts).eps
    for i, inside in enumerate((False, True, False, True)):
        c, u = _branches("eps", x[i:i + 1], float(ts[i]), labels[i:i + 1], torch.tensor([NUM_CLASSES]))
        # float64 as above (seen 0); 1e-12 absorbs only summation-order ulps.
        torch.testing.assert_close(mixed[i:i + 1], u.eps + w * (c.eps - u.eps) if inside else c.eps, rtol=1e-12, atol=1e-12)


def test_cfg_context_negative_prompt_of_other_length_is_padded_and_masked() -> None:
    """cond/uncond contexts of different token counts: padding tokens are hidden from the model by the mask."""
    seen = {}

    def model(x, t, context, context_mask):
        seen["context"], seen["mask"] = context, context_mask
        m = context_mask.to(x.dtype)[..., None]
        pooled = (context * m).sum(1) / m.sum(1)
        return x * pooled.sum(-1).reshape(-1, 1) + pooled[:, :1]

    g = torch.Generator().manual_seed(3)
    prompt, negative = torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randn(1, 2, 4, generator=g, dtype=torch.float64)
    x, t, w = torch.randn(2, 3, generator=g, dtype=torch.float64), 500.0, 5.0
    out = CFGDenoiser(Denoiser(model, SCHED), {"context": prompt}, {"context": negative}, w)(x, t)
    assert seen["context"].shape == (4, 5, 4) and seen["mask"][2:].sum(1).tolist() == [2, 2]
    plain = Denoiser(model, SCHED)
    c = plain(x, t, context=prompt, context_mask=torch.ones(2, 5, dtype=torch.bool))
    u = plain(x, t, context=negative.expand(2, 2, 4), context_mask=torch.ones(2, 2, dtype=torch.bool))
    # float64 masked means over <= 5 tokens, values O(10) after w = 5: seen 0; 1e-12 covers reordered sums.
    torch.testing.assert_close(out.eps, u.eps + w * (c.eps - u.eps), rtol=1e-12, atol=1e-12)


def test_cfg_with_a_unet_uses_its_null_label_and_checks_labels() -> None:
    from difflab.nets.unet import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(),
                          norm_groups=4, num_classes=3)).eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # a non-zero output so the branches differ
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    with torch.no_grad():
        out = CFGDenoiser(Denoiser(net, SCHED), {"class_labels": labels}, None, 3.0)(x, 100.0)
        c = net(x, torch.full((2,), 100.0), class_labels=labels)
        u = net(x, torch.full((2,), 100.0), class_labels=torch.full((2,), 3))
    # float32 UNet: batch 4 vs 2 convolutions round differently (~1e-7 relative per op over ~20 layers), then
    # amplified by 1 + 2 w = 7; seen 3.3e-6 abs (0.2 of this bound), so 1e-5 abs / 1e-4 rel keeps a 5x margin.
    torch.testing.assert_close(out.eps, u + 3.0 * (c - u), rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match=r"0\.\.2"):
        CFGDenoiser(Denoiser(net, SCHED), {"class_labels": torch.tensor([0, 3])}, None, 3.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"rescale": 1.5}, "rescale"),
    ({"interval": (600.0, 200.0)}, "interval"),
    ({"interval_unit": "seconds", "interval": (1.0, 2.0)}, "interval_unit"),
    ({"rescale_space": "score"}, "rescale_space"),
])
def test_cfg_bad_input(kwargs: dict, match: str) -> None:
    args = {"guidance_scale": 2.0, **kwargs}
    with pytest.raises(UserError, match=match):
        CFGDenoiser(Denoiser(ToyModel(), SCHED), {"class_labels": 1}, None, **args)


def test_cfg_label_range_and_condition_mismatch() -> None:
    with pytest.raises(UserError, match=r"valid labels are 0\.\.4"):
        CFGDenoiser(Denoiser(ToyModel(), SCHED), {"class_labels": torch.tensor([0, 5])}, None, 2.0, num_classes=NUM_CLASSES)
    with pytest.raises(UserError, match="same conditions"):
        pair_conditions({"class_labels": 1, "context": torch.zeros(1, 2, 3)}, {"class_labels": 5}, 4)
    with pytest.raises(UserError, match="batch 3"):
        pair_conditions({"class_labels": torch.tensor([1, 2, 3])}, {"class_labels": 5}, 4)


# ----- classifier guidance on a Gaussian mixture with its exact Bayes classifier --------------------
def mixture_classifier(gmm: GaussianMixture, schedule: NoiseSchedule):
    """Exact logits log w_k + log N(x_t; alpha mu_k, alpha^2 s_k^2 + sigma^2), i.e. p(y = k | x_t) up to a constant."""
    parts = [GaussianMixture(gmm.means[k:k + 1], gmm.stds[k:k + 1]) for k in range(len(gmm.weights))]

    def classifier(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t64 = t.detach().to(torch.float64).cpu()
        alpha, sigma = schedule.alpha(t64), schedule.sigma(t64)
        return torch.stack([p.log_prob(x, alpha, sigma) for p in parts], dim=1) + torch.log(gmm.weights)

    return classifier, parts


def _guided(gmm: GaussianMixture, label: int, scale: float) -> ClassifierGuidedDenoiser:
    classifier, _ = mixture_classifier(gmm, SCHED)
    return ClassifierGuidedDenoiser(Denoiser(gmm.eps_model(SCHED), SCHED), classifier, label, scale)


def _assign(gmm: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """The component a clean point most probably came from (Bayes rule at t = -1)."""
    classifier, _ = mixture_classifier(gmm, SCHED)
    return classifier(x, torch.full((len(x),), -1.0)).argmax(1)


def test_classifier_gradient_and_scale_one_are_exact() -> None:
    """grad log p(k|x_t) = score_k - score; at s = 1 the guided eps is component k's exact eps (Bayes' rule)."""
    gmm, k = mixture_2d(), 3
    _, parts = mixture_classifier(gmm, SCHED)
    x = 1.5 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (0.0, 120.0, 499.5, 999.0):
        a, s = SCHED.alpha(torch.tensor(t)), SCHED.sigma(torch.tensor(t))
        d = _guided(gmm, k, 1.0)
        # float64 autograd of a logsumexp over 4 components vs the closed-form score difference: seen 1.4e-14 abs
        # (6e-13 relative on near-zero entries); 1e-10 rel / 1e-12 abs keeps a 70x margin.
        torch.testing.assert_close(d.classifier_grad(x, t), parts[k].score(x, a, s) - gmm.score(x, a, s), rtol=1e-10, atol=1e-12)
        # float64, eps_hat = eps - s sigma grad against component k's exact eps: seen 2.7e-15; same bounds.
        torch.testing.assert_close(d(x, t).eps, -s * parts[k].score(x, a, s), rtol=1e-10, atol=1e-12)
        scaled = _guided(gmm, k, 2.5)(x, t)
        # float64, Alg. 2 with s = 2.5 by hand: seen 1.8e-15; same bounds.
        torch.testing.assert_close(scaled.eps, -s * (gmm.score(x, a, s) + 2.5 * d.classifier_grad(x, t)), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(scaled.alpha * scaled.x0 + scaled.sigma * scaled.eps, x)


def test_classifier_guidance_moves_samples_to_the_requested_component() -> None:
    """Scale 0: component k's share is its Bayes share of the data; it rises to ~1 with the scale (DDIM)."""
    gmm, k, n = mixture_2d(), 3, 4000
    ref = (_assign(gmm, gmm.sample(100_000, torch.Generator().manual_seed(9))) == k).double().mean().item()
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shares = [(_assign(gmm, sample(_guided(gmm, k, s), noise, "ddim", 50).samples) == k).double().mean().item()
              for s in (0.0, 0.5, 1.0, 3.0)]
    se = math.sqrt(ref * (1 - ref) * (1 / n + 1 / 100_000))
    assert abs(shares[0] - ref) < 4 * se, (shares, ref)
    assert shares[0] < shares[1] < shares[2] < shares[3], shares
    assert shares[2] > 0.9 and shares[3] > 0.99, shares


@pytest.mark.parametrize("sampler, steps", [("ddpm", 50), ("dpmpp_2m", 20), ("euler", 50), ("dpm_solver_2", 20)])
def test_classifier_guidance_with_any_sampler(sampler: str, steps: int) -> None:
    gmm, k = mixture_2d(), 0
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d = _guided(gmm, k, 5.0)
    out = sample(d, noise, sampler, steps, generator=torch.Generator().manual_seed(3))
    assert (_assign(gmm, out.samples) == k).double().mean().item() > 0.99
    assert d.classifier_calls == out.nfe  # one classifier gradient per model evaluation


def test_mean_shift_ancestral_sampling() -> None:
    """Dhariwal & Nichol Alg. 1: x_{t-1} ~ N(mu + s Sigma grad, Sigma) also lands in the requested component."""
    gmm, k, n = mixture_2d(), 3, 2000
    d = _guided(gmm, k, 0.0)
    mean, var, grad = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(0)).unbind(0)
    torch.testing.assert_close(mean_shift(mean, var.abs(), grad, 2.0), mean + 2.0 * var.abs() * grad)
    shares = []
    for scale in (0.0, 3.0):
        g = torch.Generator().manual_seed(4)
        x = torch.randn(n, 2, generator=g, dtype=torch.float64)
        grid = torch.linspace(999, -1, 101)
        for cur, nxt in zip(grid[:-1].tolist(), grid[1:].tolist()):
            p, q = point(SCHED, cur), point(SCHED, nxt)
            post = posterior(x, d(x, cur).x0, q.alpha, q.sigma, p.alpha, p.sigma)
            mu = mean_shift(post.mean, post.var, d.classifier_grad(x, cur), scale)
            x = mu if q.clean else mu + math.sqrt(post.var) * torch.randn(x.shape, generator=g, dtype=x.dtype)
        shares.append((_assign(gmm, x) == k).double().mean().item())
    assert shares[0] < 0.25 and shares[1] > 0.98, shares
    with pytest.raises(UserError, match="classifier scale"):
        mean_shift(mean, var, grad, -1.0)


def test_classifier_guidance_on_top_of_cfg() -> None:
    x, t, labels, w, s = _x(), 250.0, torch.tensor([0, 1, 2, 3]), 3.0, 2.0
    clf_w = torch.randn(12, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    classifier = lambda z, tt: torch.tanh(z.flatten(1)) @ clf_w  # noqa: E731
    cfg = CFGDenoiser(Denoiser(ToyModel(), SCHED), {"class_labels": labels}, None, w)
    both = ClassifierGuidedDenoiser(cfg, classifier, torch.tensor([3, 2, 1, 0]), s)
    out = both(x, t)
    base = CFGDenoiser(Denoiser(ToyModel(), SCHED), {"class_labels": labels}, None, w)(x, t)
    xg = x.clone().requires_grad_(True)
    logp = torch.log_softmax(classifier(xg, None), 1)[torch.arange(4), torch.tensor([3, 2, 1, 0])].sum()
    (grad,) = torch.autograd.grad(logp, xg)
    torch.testing.assert_close(out.eps, base.eps - s * base.sigma * grad)
    assert both.nfe == 1 and both.classifier_calls == 1
    torch.testing.assert_close(out.v, v_from_x0_eps(out.x0, out.eps, out.alpha, out.sigma))


def test_classifier_guidance_bad_input() -> None:
    gmm = mixture_2d()
    classifier, _ = mixture_classifier(gmm, SCHED)
    den = Denoiser(gmm.eps_model(SCHED), SCHED)
    with pytest.raises(UserError, match="classifier scale"):
        ClassifierGuidedDenoiser(den, classifier, 0, -0.5)
    with pytest.raises(UserError, match=r"valid labels are 0\.\.3"):
        ClassifierGuidedDenoiser(den, classifier, 4, 1.0, num_classes=4)
    late = ClassifierGuidedDenoiser(den, classifier, 7, 1.0)  # K unknown until the classifier answers
    with pytest.raises(UserError, match=r"valid labels are 0\.\.3"):
        late(torch.zeros(2, 2, dtype=torch.float64), 10.0)
    with pytest.raises(UserError, match="wraps a Denoiser"):
        ClassifierGuidedDenoiser(gmm.eps_model(SCHED), classifier, 0, 1.0)


# ----- condition dropout ---------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_condition_dropout_rate(p: float) -> None:
    n = 20_000
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(0))
    dropped = drop_conditions(labels, p, NUM_CLASSES, torch.Generator().manual_seed(1))
    count = int((dropped == NUM_CLASSES).sum())
    assert abs(count - n * p) < 4 * math.sqrt(n * p * (1 - p)), count  # binomial, 4 standard errors
    kept = dropped != NUM_CLASSES
    assert torch.equal(dropped[kept], labels[kept])
    again = drop_conditions(labels, p, NUM_CLASSES, torch.Generator().manual_seed(1))
    assert torch.equal(dropped, again)  # a function of the generator's seed
    assert torch.equal(drop_conditions(labels, 0.0, NUM_CLASSES), labels)
    assert bool((drop_conditions(labels, 1.0, NUM_CLASSES) == NUM_CLASSES).all())


def test_context_dropout_shares_the_mask_and_uses_the_null_embedding() -> None:
    g = torch.Generator().manual_seed(0)
    ctx, ctx_mask = torch.randn(400, 3, 2, generator=g), torch.rand(400, 3, generator=g) > 0.3
    ctx_mask[:, 0] = True
    mask = drop_mask(400, 0.25, torch.Generator().manual_seed(2))
    labels = drop_conditions(torch.zeros(400, dtype=torch.long), 0.25, 9, mask=mask)
    zeroed, zmask = drop_context(ctx, 0.25, context_mask=ctx_mask, mask=mask)
    assert torch.equal(labels == 9, mask)
    assert bool((zeroed[mask] == 0).all()) and torch.equal(zeroed[~mask], ctx[~mask])
    assert bool(zmask[mask].all()) and torch.equal(zmask[~mask], ctx_mask[~mask])
    null, null_mask = torch.ones(3, 2), torch.tensor([True, False, False])
    filled, fmask = drop_context(ctx, 0.25, context_mask=ctx_mask, null_context=null, null_mask=null_mask, mask=mask)
    assert bool((filled[mask] == 1).all()) and bool((fmask[mask] == null_mask).all())
    pooled, none = drop_context(torch.randn(400, 6, generator=g), 0.25, mask=mask)
    assert none is None and bool((pooled[mask] == 0).all())
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="dropout"):
            drop_mask(4, bad)


def test_ddpm_sampler_applies_the_mean_shift_form() -> None:
    """form="mean" through difflab.sample("ddpm") equals the hand-written Alg. 1 loop, and other samplers refuse it."""
    gmm, k, n, scale = mixture_2d(), 3, 500, 3.0
    classifier, _ = mixture_classifier(gmm, SCHED)
    guided = ClassifierGuidedDenoiser(Denoiser(gmm.eps_model(SCHED), SCHED), classifier, k, scale, form="mean")
    grid = torch.linspace(999, -1, 51, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    out = sample(guided, x, "ddpm", timesteps=grid, generator=g).samples
    g = torch.Generator().manual_seed(4)
    ref = torch.randn(n, 2, generator=g, dtype=torch.float64)
    plain = Denoiser(gmm.eps_model(SCHED), SCHED)
    for cur, nxt in zip(grid[:-1].tolist(), grid[1:].tolist()):
        p, q = point(SCHED, cur), point(SCHED, nxt)
        post = posterior(ref, plain(ref, cur).x0, q.alpha, q.sigma, p.alpha, p.sigma)
        mu = mean_shift(post.mean, post.var, guided.classifier_grad(ref, cur), scale)
        ref = mu if q.clean else mu + math.sqrt(post.var) * torch.randn(ref.shape, generator=g, dtype=ref.dtype)
    torch.testing.assert_close(out, ref)
    assert (_assign(gmm, out) == k).double().mean().item() > 0.98
    with pytest.raises(UserError, match="mean-shift form needs an ancestral sampler"):
        sample(guided, x, "ddim", 10)
    with pytest.raises(UserError, match="form"):
        ClassifierGuidedDenoiser(plain, classifier, k, scale, form="score")


def test_guidance_keeps_the_conditional_learned_variance():
    """A learned-variance model's v_raw survives both wrappers: CFG passes the conditional branch's (ddpm reads it)."""
    def model(x, t, class_labels):
        v_raw = torch.tanh(class_labels.float().view(-1, 1, 1, 1) - 1.5).expand_as(x)  # differs per branch
        return torch.cat([0.1 * x, v_raw], dim=1)

    x = torch.randn(3, 2, 4, 4)
    plain = Denoiser(model, SCHED, learn_variance=True)
    cfg = CFGDenoiser(plain, {"class_labels": torch.tensor([0, 1, 0])}, {"class_labels": 3}, 4.0)
    expected = plain(x, 10.0, class_labels=torch.tensor([0, 1, 0])).var_interp
    torch.testing.assert_close(cfg(x, 10.0).var_interp, expected)
    guided = ClassifierGuidedDenoiser(plain, lambda x, t: x.flatten(1)[:, :3], torch.tensor([0, 1, 2]), scale=2.0)
    torch.testing.assert_close(guided(x, 10.0, class_labels=torch.tensor([0, 1, 0])).var_interp, expected)


# ----- guidance against hand-computed truths ---------------------------------------------------------
def test_cfg_with_a_stub_of_known_branch_outputs():
    """A stub network answers known tensors A for the class and B for the null label: eps = B + w (A - B) by hand,
    and x0 = (x_t - sigma eps) / alpha with the schedule's alpha, sigma at t."""
    g = torch.Generator().manual_seed(11)
    A, B = torch.randn(3, 2, 5, generator=g, dtype=torch.float64), torch.randn(3, 2, 5, generator=g, dtype=torch.float64)

    def stub(x, t, class_labels):
        null, k = (class_labels == NUM_CLASSES).reshape(-1, 1, 1), len(x) // 3  # k = 2: the doubled guided batch
        return torch.where(null, B.repeat(k, 1, 1), A.repeat(k, 1, 1))

    x, t, w = torch.randn(3, 2, 5, generator=g, dtype=torch.float64), 321.0, 4.5
    out = CFGDenoiser(Denoiser(stub, SCHED), {"class_labels": 2}, {"class_labels": NUM_CLASSES}, w, num_classes=NUM_CLASSES)(x, t)
    alpha, sigma = SCHED.alpha(torch.tensor(t, dtype=torch.float64)), SCHED.sigma(torch.tensor(t, dtype=torch.float64))
    want = B + w * (A - B)
    # float64, O(10) values: 2 roundings in the formula, the affine x0 map ~3 more; 1e-12 is >1000x those.
    torch.testing.assert_close(out.eps, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.x0, (x - sigma * want) / alpha, rtol=1e-12, atol=1e-12)


class TwoGaussianClassifier(torch.nn.Module):
    """Logits log w_k + log N(x; alpha mu_k, (alpha^2 s_k^2 + sigma^2) I): the exact log p(y = k | x_t) up to a constant."""

    def __init__(self, means, stds, weights, schedule):
        super().__init__()
        self.means, self.stds, self.weights, self.schedule = means, stds, weights, schedule

    def forward(self, x, t):
        t64 = t.detach().to(torch.float64)
        a, s = self.schedule.alpha(t64).view(-1, 1, 1), self.schedule.sigma(t64).view(-1, 1, 1)
        var = a**2 * self.stds.view(1, -1, 1) ** 2 + s**2  # (B, K, 1), isotropic per component
        d = x[:, None, :] - a * self.means[None]
        return torch.log(self.weights) - 0.5 * ((d**2) / var + torch.log(2 * math.pi * var)).sum(-1)


def test_classifier_guidance_matches_the_hand_computed_gradient_of_a_two_gaussian_mixture():
    """eps_hat = eps - s sigma grad_x log p(y | x_t) (Dhariwal & Nichol 2021, Alg. 2) with everything by hand:
    v_k = alpha^2 s_k^2 + sigma^2, r_k = p(k | x_t), grad log p(y | x) = -(x - alpha mu_y) / v_y + sum_k r_k (x - alpha mu_k) / v_k,
    eps = -sigma score = sigma sum_k r_k (x - alpha mu_k) / v_k."""
    means = torch.tensor([[-1.5, 0.5], [2.0, -1.0]], dtype=torch.float64)
    stds, weights = torch.tensor([0.4, 0.8], dtype=torch.float64), torch.tensor([0.3, 0.7], dtype=torch.float64)
    gmm = GaussianMixture(means, stds, weights)
    classifier = TwoGaussianClassifier(means, stds, weights, SCHED)
    x = 2.0 * torch.randn(32, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y, scale = 0, 3.0
    for t in (5.0, 250.0, 600.0, 990.0):
        a, s = SCHED.alpha(torch.tensor(t, dtype=torch.float64)), SCHED.sigma(torch.tensor(t, dtype=torch.float64))
        v = a**2 * stds**2 + s**2  # (K,)
        d = x[:, None, :] - a * means[None]  # (B, K, D)
        logp = torch.log(weights) - 0.5 * ((d**2).sum(-1) / v + 2 * torch.log(2 * math.pi * v))
        r = torch.softmax(logp, dim=1)[..., None]
        pull = (r * d / v[None, :, None]).sum(1)  # -score
        grad = -d[:, y] / v[y] + pull
        eps_hand = s * pull
        guided = ClassifierGuidedDenoiser(Denoiser(gmm.eps_model(SCHED), SCHED), classifier, y, scale)
        out = guided(x, t)
        # float64 throughout (model, classifier, autograd): a few tens of roundings on O(10) values; seen 4.2e-15, >200x below.
        torch.testing.assert_close(guided.classifier_grad(x, t), grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.eps, eps_hand - scale * s * grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.x0, (x - s * out.eps) / a, rtol=1e-10, atol=1e-12)

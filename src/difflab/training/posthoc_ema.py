"""Post-hoc EMA: power-function EMA snapshots during training, any EMA length reconstructed afterwards.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2), sec. 3 and
appendix C. A power-function EMA with exponent ``gamma`` averages the weights with the profile

    p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)  on [0, t],   theta_hat(t) = integral p(tau) theta(tau) dtau,

whose standard deviation relative to ``t`` is ``sigma_rel`` (the "EMA length"). Each snapshot (gamma_i, t_i)
stores one such average; the least-squares combination of their profiles that matches a target profile,
applied to the stored weights, gives the EMA of any other length.

Time convention (continuous time, in optimizer steps): the weights after step ``i`` hold over the interval
``(i - 1, i]``, i.e. theta(tau) is piecewise constant. With it, the per-step update
``theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t``, ``beta_t = (1 - 1/t)^(gamma + 1)``, equals
the integral exactly (the weight of theta_i is ``(i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1)``, the
integral of p over the cell), so the closed-form profile inner products of the reconstruction are exact too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from difflab.errors import UserError
from difflab.io.files import atomic_write

FORMAT = "difflab.posthoc_ema/1"
SNAPSHOT_DIR = "ema_snapshots"
GAMMA_PEAK = (math.sqrt(5.0) - 3.0) / 2.0  # d sigma_rel / d gamma = 0 here: sigma_rel is largest
# Relative L2 error of the fitted averaging profile above which a length counts as not reconstructable.
# Why 5 %: it is the distance between the exact profiles of two lengths about 6 % apart (sigma_rel 0.100 vs
# 0.105 differ by 4.4 %, 0.050 vs 0.0525 by 3.8 %), so inside the limit the rebuilt average is as close to the
# asked one as the EMA of a neighbouring length, much finer than the differences between the lengths one
# compares (0.05, 0.07, 0.10, ...). Outside it the snapshots extrapolate and the error climbs steeply (docs/posthoc_ema.md: 20
# snapshots per default tracker fit 0.03 to 2.6 % but 0.02 to 8.7 %), so the exact limit moves the edge of the
# range little (there 1 % -> 0.038, 5 % -> 0.025, 10 % -> 0.019), while a much larger one would accept profiles
# that are another length's (20 % is the distance from 0.10 to about 0.125).
MAX_FIT_ERROR = 0.05


def gamma_to_sigma_rel(gamma: float) -> float:
    """``sigma_rel = (gamma+1)^(1/2) (gamma+2)^(-1) (gamma+3)^(-1/2)``: std of p(tau) over t (EDM2 sec. 3.1)."""
    if not gamma > -1:
        raise UserError(f"power EMA exponent gamma={gamma!r} must be > -1")
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_PEAK)  # about 0.3003; gamma = 0 (uniform average) gives 0.2887


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Invert :func:`gamma_to_sigma_rel` on the branch gamma > (sqrt(5) - 3)/2, where longer EMAs mean smaller gamma.

    ``sigma_rel^2 (gamma+2)^2 (gamma+3) = gamma + 1`` is the cubic
    ``s^2 g^3 + 7 s^2 g^2 + (16 s^2 - 1) g + 12 s^2 - 1 = 0`` (s = sigma_rel); we take its largest real root.
    """
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise UserError(f"EMA length sigma_rel={sigma_rel!r} is out of range: a power-function EMA has 0 < sigma_rel < "
                        f"{SIGMA_REL_MAX:.5f}; use e.g. 0.05 or 0.1")
    s2 = sigma_rel * sigma_rel
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return max(float(np.max(roots.real)), GAMMA_PEAK)  # all three roots are real; a double root at the peak


class PowerEMA:
    """One power-function EMA of a model's weights (EDM2 sec. 3.1), updated after each optimizer step.

    ``update(model, step)`` applies ``theta_hat <- beta theta_hat + (1 - beta) theta`` with
    ``beta = (s / t)^(gamma + 1)`` from the previous update's step s to the new step t: ``(1 - 1/t)^(gamma+1)``
    when t = s + 1; for t > s + 1 it is exact if the weights were the new ones over (s, t], so call it after
    every step (also steps whose optimizer update was skipped). Parameters are averaged in place on
    their device with foreach ops; buffers are copied.
    """

    def __init__(self, model: nn.Module, sigma_rel: float) -> None:
        self.sigma_rel = float(sigma_rel)
        self.gamma = sigma_rel_to_gamma(self.sigma_rel)
        self.step = 0
        state = model.state_dict(keep_vars=True)
        self.averaged = {k: v.detach().clone() for k, v in state.items() if isinstance(v, nn.Parameter)}
        self.copied = {k: v.detach().clone() for k, v in state.items() if not isinstance(v, nn.Parameter)}

    def to(self, device: str | torch.device) -> PowerEMA:
        self.averaged = {k: v.to(device) for k, v in self.averaged.items()}
        self.copied = {k: v.to(device) for k, v in self.copied.items()}
        return self

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average in the weights of ``model`` after optimizer step ``step`` (1-based, increasing)."""
        if step <= self.step:
            raise ValueError(f"PowerEMA.update: step {step} is not after the last update (step {self.step})")
        beta = (self.step / step) ** (self.gamma + 1)
        state = model.state_dict(keep_vars=True)
        keys = list(self.averaged)
        torch._foreach_lerp_([self.averaged[k] for k in keys], [state[k].detach() for k in keys], 1.0 - beta)
        for k, buffer in self.copied.items():
            buffer.copy_(state[k])
        self.step = int(step)

    def weights(self) -> dict[str, Tensor]:
        """The current average as a model state dict (parameters averaged, buffers the latest)."""
        return {**self.averaged, **self.copied}

    def state_dict(self) -> dict[str, Any]:
        return {"sigma_rel": self.sigma_rel, "gamma": self.gamma, "step": self.step, "weights": self.weights()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not math.isclose(float(state["sigma_rel"]), self.sigma_rel, rel_tol=1e-12):
            raise UserError(f"post-hoc EMA state has sigma_rel={state['sigma_rel']} but this tracker has {self.sigma_rel}")
        weights = state["weights"]
        if set(weights) != set(self.averaged) | set(self.copied):
            raise UserError("post-hoc EMA state holds the weights of another model; resume with the original model config")
        for k, target in self.weights().items():
            target.copy_(weights[k])
        self.step = int(state["step"])


# ----- checkpoint and snapshot files ----------------------------------------------------------------
def checkpoint_entries(trackers: list[PowerEMA]) -> tuple[dict[str, dict[str, Tensor]], list[dict[str, Any]]]:
    """(``{"posthoc_ema_<i>": weights}`` for the checkpoint's safetensors, JSON-able ``[{sigma_rel, gamma, step}]``)."""
    tensors = {f"posthoc_ema_{i}": t.weights() for i, t in enumerate(trackers)}
    meta = [{"sigma_rel": t.sigma_rel, "gamma": t.gamma, "step": t.step} for t in trackers]
    return tensors, meta


def load_checkpoint_entries(trackers: list[PowerEMA], tensors: dict[str, dict[str, Tensor]], meta: list[dict[str, Any]]) -> None:
    """Restore trackers saved by :func:`checkpoint_entries`; the configured sigma_rels must match the saved ones."""
    if not trackers:
        return
    saved, wanted = [m["sigma_rel"] for m in meta], [t.sigma_rel for t in trackers]
    if len(saved) != len(wanted) or not all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(saved, wanted)):
        raise UserError(f"the checkpoint's post-hoc EMA trackers have sigma_rels {saved} but the config asks for {wanted}; "
                        f"resume with posthoc_ema.sigma_rels: {saved} (a tracker must run from step 0)")
    for i, (tracker, m) in enumerate(zip(trackers, meta)):
        tracker.load_state_dict({**m, "weights": tensors[f"posthoc_ema_{i}"]})


@dataclass(frozen=True)
class Snapshot:
    path: Path
    sigma_rel: float
    gamma: float
    step: int
    copied: tuple[str, ...] = ()  # buffer names (copied, not averaged)


def save_snapshot(run_dir: str | Path, tracker: PowerEMA) -> Path:
    """Write ``RUN_DIR/ema_snapshots/sigma<sigma_rel>-step<step>.safetensors`` atomically, with gamma and step as metadata."""
    path = Path(run_dir) / SNAPSHOT_DIR / f"sigma{tracker.sigma_rel:g}-step{tracker.step:09d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tracker.weights().items()}
    metadata = {"format": FORMAT, "sigma_rel": repr(tracker.sigma_rel), "gamma": repr(tracker.gamma),
                "step": str(tracker.step), "copied": json.dumps(sorted(tracker.copied))}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))
    return path


def list_snapshots(snapshot_dir: str | Path) -> list[Snapshot]:
    """Every post-hoc EMA snapshot in ``snapshot_dir``, sorted by (step, sigma_rel)."""
    snaps = []
    for path in sorted(Path(snapshot_dir).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"snapshot {path} is unreadable ({err}); delete it and reconstruct from the others") from None
        if meta.get("format") == FORMAT:
            snaps.append(Snapshot(path, float(meta["sigma_rel"]), float(meta["gamma"]), int(meta["step"]),
                                  tuple(json.loads(meta.get("copied", "[]")))))
    return sorted(snaps, key=lambda s: (s.step, s.sigma_rel))


# ----- reconstruction (EDM2 app. C) -------------------------------------------------------------
def profile_inner_products(gammas_a: Any, steps_a: Any, gammas_b: Any, steps_b: Any) -> np.ndarray:
    """``<p_i, p_j> = (g_i+1)(g_j+1) min(t_i, t_j)^(g_i+g_j+1) / ((g_i+g_j+1) t_i^(g_i+1) t_j^(g_j+1))``.

    The L2 inner products of the profiles p(tau) = (g+1) tau^g / t^(g+1) on [0, t], evaluated in log space
    (t^(g+1) overflows float64 for long runs).
    """
    ga, ta = np.asarray(gammas_a, float)[:, None], np.asarray(steps_a, float)[:, None]
    gb, tb = np.asarray(gammas_b, float)[None, :], np.asarray(steps_b, float)[None, :]
    g = ga + gb + 1
    log = (np.log(ga + 1) + np.log(gb + 1) - np.log(g) + g * np.log(np.minimum(ta, tb))
           - (ga + 1) * np.log(ta) - (gb + 1) * np.log(tb))
    return np.exp(log)


def solve_coefficients(gammas: Any, steps: Any, gamma: float, step: float) -> tuple[np.ndarray, float, float]:
    """Least-squares ``c`` minimising ``||sum_i c_i p_i - p*||`` over the stored profiles (EDM2 app. C).

    Solves the Gram system ``A c = b`` (``A_ij = <p_i, p_j>``, ``b_i = <p_i, p*>``) with ``lstsq`` after
    scaling every profile to unit norm. Returns (c, relative error ||fit - p*|| / ||p*||, absolute error).
    """
    coeffs, relative, absolute = fit_profiles(gammas, steps, [gamma], step)
    return coeffs[:, 0], float(relative[0]), float(absolute[0])


def fit_profiles(gammas: Any, steps: Any, target_gammas: Any, step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`solve_coefficients` for several targets at once (one column of ``c`` per target exponent at ``step``)."""
    gram = profile_inner_products(gammas, steps, gammas, steps)
    targets = np.asarray(target_gammas, float)
    at = np.full(len(targets), float(step))
    rhs = profile_inner_products(gammas, steps, targets, at)
    norms2 = np.diag(profile_inner_products(targets, at, targets, at))  # <p*, p*>, rounded as rhs is (err2 cancels)
    scale = 1.0 / np.sqrt(np.diag(gram))
    scaled = np.linalg.lstsq(gram * scale[:, None] * scale[None, :], rhs * scale[:, None], rcond=None)[0]
    coeffs = scaled * scale[:, None]
    err2 = np.array([c @ gram @ c - 2 * c @ b + t for c, b, t in zip(coeffs.T, rhs.T, norms2)])
    absolute = np.sqrt(np.maximum(err2, 0.0))
    return coeffs, absolute / np.sqrt(norms2), absolute


def reconstructable_range(gammas: Any, steps: Any, step: float, max_fit_error: float = MAX_FIT_ERROR,
                          num: int = 400) -> tuple[float, float] | None:
    """The widest interval of EMA lengths whose profile at ``step`` the snapshots ``(gammas, steps)`` fit to
    within ``max_fit_error``, on a log grid of ``num`` lengths in [0.001, 0.3003) (about 1.5 % apart), or None."""
    grid = np.geomspace(1e-3, SIGMA_REL_MAX * (1 - 1e-6), num)
    _, errors, _ = fit_profiles(gammas, steps, [sigma_rel_to_gamma(float(s)) for s in grid], step)
    best, start = None, None
    for i, ok in enumerate([*(errors <= max_fit_error), False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return None if best is None else (float(grid[best[0]]), float(grid[best[1] - 1]))


@dataclass
class ReconstructionReport:
    """What :func:`reconstruct` combined, and how well the averaging profile was matched."""

    sigma_rel: float
    gamma: float
    step: int
    fit_error: float  # ||sum_i c_i p_i - p*|| / ||p*||, relative L2 error of the averaging profile
    profile_error: float  # the same, absolute (units 1/sqrt(step)): |EMA error| <= profile_error * ||theta||_L2[0, step]
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # {file, sigma_rel, step, coefficient}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reconstruct(snapshot_dir: str | Path, sigma_rel: float, step: int | None = None, *,
                max_fit_error: float = MAX_FIT_ERROR) -> tuple[dict[str, Tensor], ReconstructionReport]:
    """The power-function EMA of length ``sigma_rel`` at ``step`` (default: the last snapshot) from stored snapshots.

    Uses the snapshots taken at or before ``step``; raises :class:`UserError` if there are none, if
    ``sigma_rel`` is no power-function EMA, or if the profile fit error exceeds ``max_fit_error``.
    """
    snapshot_dir = Path(snapshot_dir)
    snaps = list_snapshots(snapshot_dir) if snapshot_dir.is_dir() else []
    if not snaps:
        raise UserError(f"no post-hoc EMA snapshots in {snapshot_dir}; train with `posthoc_ema: {{snapshot_every: 500}}` "
                        "in the --config YAML to store them")
    gamma = sigma_rel_to_gamma(sigma_rel)
    step = snaps[-1].step if step is None else int(step)
    used = [s for s in snaps if s.step <= step]
    if not used:
        raise UserError(f"--step {step} is before the first post-hoc EMA snapshot (step {snaps[0].step}); "
                        f"choose a step in [{snaps[0].step}, {snaps[-1].step}]")
    coeffs, fit_error, profile_error = solve_coefficients([s.gamma for s in used], [s.step for s in used], gamma, step)
    if not fit_error <= max_fit_error:
        raise UserError(_unreconstructable(sigma_rel, step, fit_error, max_fit_error, used, snaps))
    report = ReconstructionReport(sigma_rel, gamma, step, fit_error, profile_error,
                                  [{"file": s.path.name, "sigma_rel": s.sigma_rel, "step": s.step, "coefficient": float(c)}
                                   for s, c in zip(used, coeffs)])
    return combine_snapshots(used, coeffs), report


def _unreconstructable(sigma_rel: float, step: int, fit_error: float, max_fit_error: float, used: list[Snapshot],
                       snaps: list[Snapshot]) -> str:
    """One line: why ``sigma_rel`` cannot be rebuilt at ``step``, and which lengths (or steps) can."""
    trained = ", ".join(f"{s:g}" for s in sorted({s.sigma_rel for s in used}))
    count = f"{len(used)} snapshot{'s' if len(used) > 1 else ''}"
    head = (f"EMA length {sigma_rel:g} at step {step} is out of the reconstructable range: its averaging profile is "
            f"fitted only to within {fit_error:.1%} (limit {max_fit_error:.0%}, --max-fit-error) by the {count} at or before "
            f"that step (sigma_rel {trained})")
    span = reconstructable_range([s.gamma for s in used], [s.step for s in used], step, max_fit_error)
    if span is not None:
        return f"{head}; lengths {span[0]:.3g} to {span[1]:.3g} can be reconstructed at step {step}"
    near = sorted({used[-1].step, *[s.step for s in snaps if s.step > step][:1]})
    return (f"{head}; no length can be reconstructed at step {step} from these snapshots: store more of them "
            f"(posthoc_ema.snapshot_every) or use a snapshot step such as {' or '.join(map(str, near))} (--step)")


def combine_snapshots(snaps: list[Snapshot], coeffs: Any) -> dict[str, Tensor]:
    """``sum_i c_i theta_hat_i`` of the averaged tensors (accumulated in float64); buffers from the latest snapshot."""
    total: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    latest = max(snaps, key=lambda s: s.step)
    keys: set[str] | None = None
    for snap, c in zip(snaps, coeffs):
        tensors = load_file(str(snap.path))
        if keys is not None and set(tensors) != keys:
            raise UserError(f"snapshot {snap.path} holds the weights of another model than the other snapshots; remove it")
        keys = set(tensors)
        for k, v in tensors.items():
            if k in snap.copied:
                continue
            dtypes[k] = v.dtype
            if k in total:
                total[k].add_(v.double(), alpha=float(c))
            else:
                total[k] = v.double() * float(c)
    out = {k: v.to(dtypes[k]) for k, v in total.items()}
    if latest.copied:
        out.update({k: v for k, v in load_file(str(latest.path)).items() if k in latest.copied})
    return out

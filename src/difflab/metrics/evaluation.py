"""``evaluate``: one call from images (and a reference) to a JSON-able dict of metrics.

Metric names: ``fid``, ``is``, ``precision``, ``recall``, ``density``, ``coverage`` (``prdc`` = the last
four) on TF Inception-v3 features, and ``domain_fid``, ``domain_is`` on a difflab digit classifier
(labelled "domain ..." everywhere; never comparable to FID/IS). Images pass one protocol
(``preprocess``): uint8 quantisation, grey -> RGB, each image resized to 299 with PIL bicubic.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from difflab.errors import UserError
from difflab.metrics.domain import DigitClassifier, DomainExtractor
from difflab.metrics.features import Extractor, FeatureSet, InceptionExtractor, extract_features
from difflab.metrics.frechet import frechet_distance
from difflab.metrics.iscore import inception_score
from difflab.metrics.manifold import prdc
from difflab.metrics.preprocess import ImageSource
from difflab.metrics.reference import PROTOCOL, reference_records
from difflab.metrics.stats import StatsRecord

PRDC = ("precision", "recall", "density", "coverage")
METRICS = ("fid", "is", *PRDC, "domain_fid", "domain_is")
INCEPTION_METRICS = {"fid", "is", *PRDC}
DOMAIN_METRICS = {"domain_fid", "domain_is"}
NEEDS_REFERENCE = {"fid", *PRDC, "domain_fid"}
LABELS = {
    "fid": "FID (Heusel et al. 2017) on TF Inception-v3 2015-12-05 pool3 features (2048-d)",
    "is": "Inception Score (Salimans et al. 2016), TF Inception-v3 1008-way softmax",
    "precision": "precision (Kynkäänniemi et al. 2019), Inception pool3 k-NN manifolds",
    "recall": "recall (Kynkäänniemi et al. 2019), Inception pool3 k-NN manifolds",
    "density": "density (Naeem et al. 2020), Inception pool3 k-NN balls",
    "coverage": "coverage (Naeem et al. 2020), Inception pool3 k-NN balls",
    "domain_fid": "domain FID: Fréchet distance on difflab digit-classifier features (not comparable to FID)",
    "domain_is": "domain IS: Inception-Score formula on difflab digit-classifier logits (not comparable to IS)",
}
# Sample sizes below which an estimate is unstable (FID: the 2048-d covariance is rank-deficient).
MIN_SAMPLES = {"fid": 2048, "is": 5000, "prdc": 1000}


def parse_metrics(metrics: str | Iterable[str]) -> list[str]:
    """Normalise names (comma-separated string or list; ``prdc`` expands), rejecting unknown ones."""
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        expanded = PRDC if name == "prdc" else (name,)
        for item in expanded:
            if item not in METRICS:
                raise UserError(f"unknown metric {raw!r}; choose from {', '.join(METRICS)} or 'prdc'")
            if item not in out:
                out.append(item)
    if not out:
        raise UserError(f"no metric requested; choose from {', '.join(METRICS)}")
    return out


def _warn(messages: list[str], text: str) -> None:
    messages.append(text)
    warnings.warn(text, UserWarning, stacklevel=3)


def _input_warnings(sizes: dict[str, int], channels: dict[str, int], what: str, grey_matters: bool,
                    messages: list[str]) -> None:
    if len(sizes) > 1:
        _warn(messages, f"{what} images come in {len(sizes)} sizes {sorted(sizes)}; each was resized on its "
                        "own to the network size with PIL bicubic (clean-fid protocol)")
    if grey_matters and channels.get("1"):
        _warn(messages, f"{channels['1']} greyscale {what} images were repeated to 3 channels for Inception")
    if channels.get("4"):
        _warn(messages, f"{channels['4']} {what} images had an alpha channel, which was dropped")


def _collect_warnings(names: list[str], gen: FeatureSet, refs: dict[str, StatsRecord],
                      grey_matters: bool) -> list[str]:
    """Warnings about the inputs (sizes, channels) and about sample sizes too small for stable estimates."""
    messages: list[str] = []
    _input_warnings(gen.sizes, {str(k): v for k, v in gen.channels.items()}, "generated", grey_matters, messages)
    if "inception" in refs:
        meta = refs["inception"].metadata
        _input_warnings(meta.get("sizes", {}), meta.get("channels", {}), "reference", True, messages)
    _size_warnings(names, gen.count, refs, messages)
    return messages


def _size_warnings(names: list[str], n_gen: int, refs: dict[str, StatsRecord], messages: list[str]) -> None:
    ref_n = refs["inception"].count if "inception" in refs else None
    if "fid" in names:
        for what, n in (("generated", n_gen), ("reference", ref_n)):
            if n is not None and 0 < n < MIN_SAMPLES["fid"]:
                _warn(messages, f"FID from {n} {what} images: a full-rank 2048-d covariance needs >= 2048 "
                                "(FID is biased upward at small n; papers use 10k-50k)")
    if "is" in names and n_gen < MIN_SAMPLES["is"]:
        _warn(messages, f"Inception Score from {n_gen} images: use >= 5000 (papers: 50k in 10 splits)")
    if any(m in names for m in PRDC) and n_gen < MIN_SAMPLES["prdc"]:
        _warn(messages, f"precision/recall/density/coverage from {n_gen} images: k-NN radii are noisy below "
                        "1000 samples (the papers use 10k-50k)")
    if "domain_fid" in names and "domain" in refs:
        dim = len(refs["domain"].mu)
        if n_gen <= dim:
            _warn(messages, f"domain FID from {n_gen} images: a full-rank {dim}-d covariance needs > {dim}")


def _space_metrics(names: list[str], gen: FeatureSet, ref: StatsRecord | None, prefix: str, splits: int,
                   k: tuple[int, int]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    base = {"feature_space": gen.extractor, "num_images": gen.count}
    ref_info = {"num_reference": ref.count} if ref is not None else {}
    if f"{prefix}fid" in names and ref is not None:
        value = frechet_distance(gen.stats.mean, gen.stats.covariance, ref.mu, ref.sigma)
        out[f"{prefix}fid"] = {"value": value, **base, **ref_info}
    if f"{prefix}is" in names and gen.logits is not None:
        mean, std = inception_score(gen.logits, splits=splits)
        out[f"{prefix}is"] = {"value": mean, "std": std, "splits": splits, **base}
    wanted = [m for m in PRDC if m in names] if not prefix else []
    if wanted and ref is not None and ref.features is not None and gen.features is not None:
        scores = prdc(ref.features, gen.features, k_pr=k[0], k_dc=k[1])
        for m in wanted:
            out[m] = {"value": scores[m], "k": k[0] if m in ("precision", "recall") else k[1],
                      **base, "num_images": len(gen.features), "num_reference": len(ref.features)}
    for name, entry in out.items():
        entry["label"] = LABELS[name]
    return out


def _extractors(names: list[str], weights: str | os.PathLike | None, domain_model: Any,
                device: str) -> dict[str, Extractor]:
    spaces: dict[str, Extractor] = {}
    if INCEPTION_METRICS & set(names):
        spaces["inception"] = InceptionExtractor(weights, device=device)
        if "is" in names and not spaces["inception"].has_logits:
            raise UserError(f"the Inception Score needs the 1008-way classifier, which "
                            f"{spaces['inception'].weights_path.name} lacks; use pytorch-fid's "
                            "pt_inception-2015-12-05-6726825d.pth (weights=PATH or the torch hub cache)")
    if DOMAIN_METRICS & set(names):
        if domain_model is None:
            raise UserError("domain_fid/domain_is need a domain classifier: pass domain_model=DIR (saved with "
                            "DigitClassifier.save_pretrained) or train one with train_mnist_classifier(mnist_dir)")
        model = domain_model if isinstance(domain_model, DigitClassifier) else \
            DigitClassifier.from_pretrained(domain_model)
        spaces["domain"] = DomainExtractor(model)
    return spaces


def evaluate(images: ImageSource, metrics: str | Sequence[str] = ("fid",),
             reference: ImageSource | StatsRecord | None = None, *, batch_size: int = 50,
             value_range: tuple[float, float] = (0.0, 1.0), weights: str | os.PathLike | None = None,
             domain_model: DigitClassifier | str | os.PathLike | None = None,
             cache_dir: str | os.PathLike | None = None, reference_name: str | None = None,
             prdc_samples: int = 10000, prdc_k: tuple[int, int] = (3, 5), splits: int = 10,
             device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Compute ``metrics`` for ``images`` against ``reference`` and return a JSON-able dict.

    ``images`` / ``reference``: a folder, tensors ``(N, C, H, W)`` (float in ``value_range`` or uint8),
    numpy ``(N, H, W, C)``, PIL images, or an iterable of these; ``reference`` may also be a cached
    statistics ``.npz``. Reference statistics of folders are cached per dataset and resolution.
    ``prdc_samples`` caps the images used by precision/recall/density/coverage (k = ``prdc_k``).

    Example:
        >>> result = evaluate("samples/", ["fid", "is"], reference="cifar10_test/")  # doctest: +SKIP
        >>> result["metrics"]["fid"]["value"]                                       # doctest: +SKIP
    """
    names = parse_metrics(metrics)
    if NEEDS_REFERENCE & set(names) and reference is None:
        raise UserError(f"{', '.join(sorted(NEEDS_REFERENCE & set(names)))} need a reference: a folder of real "
                        "images or a statistics .npz")
    spaces = _extractors(names, weights, domain_model, device)
    keep = prdc_samples if any(m in names for m in PRDC) else 0
    gen_sets = dict(zip(spaces, extract_features(
        images, list(spaces.values()), batch_size=batch_size, value_range=value_range, keep_features=keep,
        keep_logits=bool({"is", "domain_is"} & set(names)), progress=progress, desc="generated")))
    refs: dict[str, StatsRecord] = {}
    ref_spaces = [s for s in spaces if (s == "inception" and {"fid", *PRDC} & set(names))
                  or (s == "domain" and "domain_fid" in names)]
    if ref_spaces:
        records = reference_records(reference, [spaces[s] for s in ref_spaces], keep_features=keep,
                                    cache_dir=cache_dir, name=reference_name, batch_size=batch_size,
                                    value_range=value_range, progress=progress)
        refs = dict(zip(ref_spaces, records))
    first = next(iter(gen_sets.values()))
    messages = _collect_warnings(names, first, refs, grey_matters="inception" in spaces)
    results: dict[str, dict[str, Any]] = {}
    for space, fs in gen_sets.items():
        prefix = "domain_" if space == "domain" else ""
        results.update(_space_metrics(names, fs, refs.get(space), prefix, splits, prdc_k))
    return {"metrics": {m: results[m] for m in names if m in results}, "num_images": first.count,
            "protocol": {"images": PROTOCOL, "value_range": list(value_range), "batch_size": batch_size,
                         "inception_weights": str(getattr(spaces.get("inception"), "weights_path", "")) or None,
                         "domain_extractor": spaces["domain"].name if "domain" in spaces else None},
            "inputs": {"sizes": first.sizes, "channels": {str(k): v for k, v in first.channels.items()}},
            "warnings": messages}

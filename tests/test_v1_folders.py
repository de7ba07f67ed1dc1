"""Model folders written by difflab v1 (tests/fixtures/v1, made by tests/fixtures/make_v1_fixtures.py at commit
4dd3bed) still load and sample identically: the truth is what v1 itself sampled from them.

Identically up to float32 rounding: bit-equal on the CPU that recorded the outputs (an Intel Xeon), while another
CPU's kernels (other SIMD widths, so other summation orders) round differently: seen up to 1.2e-6 on an AMD EPYC
for samples of magnitude <= 1 after 3-4 steps. ``close`` allows 1e-5 (about 80 float32 ulps at 1); a wrong weight,
config key, schedule or parameterization moves samples by O(0.1)."""

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

V1 = Path(__file__).parent / "fixtures" / "v1"


@pytest.fixture(scope="module")
def reference():
    return load_file(str(V1 / "reference_outputs.safetensors"))


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def _load_pipeline(folder):
    from difflab import DiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return DiffusionPipeline.from_pretrained(V1 / folder)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_v1_class_conditional_folder_samples_identically(reference, sampler, one_thread):
    pipe = _load_pipeline("diffusion_class")
    out = pipe(num_images=2, num_inference_steps=4, sampler=sampler, seed=0, progress=False,
               class_labels=[0, 1], guidance_scale=2.0)
    close(out.samples, reference[sampler])


def test_v1_latent_folder_samples_identically(reference, one_thread):
    pipe = _load_pipeline("latent")
    out = pipe(num_images=2, num_inference_steps=3, seed=5, progress=False)
    close(out.samples, reference["latent_ddim"])


def test_v1_classifier_folder_gives_identical_logits(reference, one_thread):
    from difflab.nets.classifier import NoisyClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        clf = NoisyClassifier.from_pretrained(V1 / "classifier")
    with torch.no_grad():
        logits = clf(reference["classifier_input"], torch.tensor([3.0, 20.0]))
    close(logits, reference["classifier_logits"])

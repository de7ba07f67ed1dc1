"""Interoperability with other libraries' model folders.

* :mod:`difflab.interop.diffusers_config`: a diffusers scheduler config as a difflab noise schedule,
  parameterization and time grid (no diffusers import needed).
* :mod:`difflab.interop.diffusers_sd`: Stable-Diffusion-format folders (``model_index.json``) loaded into
  :class:`~difflab.pipelines.text2image.Text2ImagePipeline`; needs ``pip install 'difflab[diffusers]'``.
"""

"""Editing by sampling: inpainting (replacement, RePaint) and SDEdit image-to-image, for any denoiser.

They sit beside the samplers (over denoisers, schedules and the sampler callback) and know nothing of images:
``known`` and ``keep`` are tensors of the samples' shape, so the same code fills masked pixels, audio gaps or
missing coordinates. Pipelines turn PNG masks and pictures into these tensors.
"""

from difflab.editing.inpaint import inpaint, known_mask, repaint, repaint_path, replace_known
from difflab.editing.sdedit import sdedit, sdedit_grid

__all__ = ["inpaint", "known_mask", "repaint", "repaint_path", "replace_known", "sdedit", "sdedit_grid"]

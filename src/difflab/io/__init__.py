"""The lowest layer: files, the network registry, model and pipeline folders (imports torch, safetensors,
the standard library and :mod:`difflab.errors` only). See docs/model_folders.md."""

from difflab.io.configs import JsonConfig
from difflab.io.files import atomic_write, ensure_writable_dir, ensure_writable_file
from difflab.io.model_folder import (
    PretrainedModel,
    V1FolderWarning,
    load_model,
    load_weights,
    read_model_config,
    save_model,
)
from difflab.io.pipeline_folder import read_pipeline_folder, save_pipeline_folder
from difflab.io.registry import network_class, network_names, register_network

__all__ = ["JsonConfig", "PretrainedModel", "V1FolderWarning", "atomic_write", "ensure_writable_dir", "ensure_writable_file",
           "load_model", "load_weights", "network_class", "network_names", "read_model_config",
           "read_pipeline_folder", "register_network", "save_model", "save_pipeline_folder"]

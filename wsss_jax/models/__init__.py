"""Backbones, heads, pretrained-weight import and the model registry.

Public entry points: `build_model(config.model, num_classes, kind)`,
`load_pretrained(config.model, variables)`, `build_backbone(config.model)`,
`frozen_param_regexes(config.model)`; the modules
`efficientnet_lite`, `resnet`, `heads`, `batch_norm`, `lowering`, `weights`, `torch_pickle`.
"""
from wsss_jax.models.registry import BACKBONES
from wsss_jax.models.registry import build_backbone
from wsss_jax.models.registry import build_model
from wsss_jax.models.registry import CAMNet
from wsss_jax.models.registry import DeepLabV3Plus
from wsss_jax.models.registry import frozen_param_regexes
from wsss_jax.models.registry import KINDS
from wsss_jax.models.registry import load_pretrained

__all__ = ["BACKBONES", "KINDS", "CAMNet", "DeepLabV3Plus", "build_backbone", "build_model",
           "frozen_param_regexes", "load_pretrained"]

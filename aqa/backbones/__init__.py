"""Backbones behind one protocol (see ``base.py``). Importing this package registers each of them."""

from aqa.backbones import (
    kimi_audio,  # noqa: F401  (registers "kimi_audio")
    qwen2_5_omni,  # noqa: F401  (registers "qwen2_5_omni")
    qwen2_audio,  # noqa: F401  (registers "qwen2_audio")
    text_llm,  # noqa: F401  (registers "text_llm")
)
from aqa.backbones.base import (
    Backbone,
    Example,
    Rollout,
    SamplingConfig,
    backbone_for_model_type,
    backbones,
    get_backbone,
    register,
)

__all__ = ["Backbone", "Example", "Rollout", "SamplingConfig", "backbone_for_model_type", "backbones", "get_backbone",
           "register"]

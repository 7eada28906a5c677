"""The rollout engine: what samples a micro-batch's G completions per question for the recipe.

The recipe talks to a :class:`RolloutEngine` only, so another engine (an external server such as vLLM,
which serves Qwen2-Audio and Qwen2.5-Omni) can be added here without touching ``train/grpo.py``: it must
return a :class:`~aqa.backbones.base.Rollout` the backbone can score again (``completion_logprobs``),
whose completions were sampled from the current policy's weights.

Engines in this process (``grpo.rollout.engine``):

- ``static``: a static KV cache of one row per question (the prompt once, then G x max_new_tokens slots),
  one decode step for all G completions, sampling on the device without a sort, the step captured as a
  CUDA graph on CUDA (``aqa/backbones/static_decode.py``); with ``grpo.rollout.merge_lora`` through merged
  copies of the LoRA'd weights (one more copy of them in memory; the base and LoRA weights untouched);
- ``eager``: the prompt's dynamic KV cache expanded to G rows and one Python step per token
  (``aqa/backbones/shared_prefix.py``): the reference the static engine is tested against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn

from aqa.backbones.base import Backbone, Rollout, SamplingConfig
from aqa.backbones.static_decode import StaticDecoder
from aqa.data.example import Example
from aqa.grpo.config import ROLLOUT_ENGINES, RolloutConfig


class RolloutEngine(ABC):
    """Samples G completions per question with the current policy."""

    @abstractmethod
    def generate(self, backbone: Backbone, model: nn.Module, examples: list[Example], num_samples: int,
                 sampling: SamplingConfig) -> Rollout:
        """``[B, G, T]`` completions of ``examples`` under ``model`` (the policy, possibly wrapped)."""


class InProcessEngine(RolloutEngine):
    """The policy's own weights in this process, through the backbone's ``generate``. ``decoder``: the decode
    loop (a :class:`StaticDecoder`, kept for the run so its cache and CUDA graph are reused; None: eager)."""

    def __init__(self, decoder: StaticDecoder | None = None):
        self.decoder = decoder

    def generate(self, backbone, model, examples, num_samples, sampling) -> Rollout:
        return backbone.generate(model, examples, num_samples, sampling, decoder=self.decoder)


ENGINES = {
    "static": lambda cfg: InProcessEngine(StaticDecoder(cuda_graph=cfg.cuda_graph, merge_lora=cfg.merge_lora)),
    "eager": lambda cfg: InProcessEngine(None),
}
assert set(ENGINES) == set(ROLLOUT_ENGINES)  # the config validates names against ROLLOUT_ENGINES


def build_rollout_engine(cfg: RolloutConfig) -> RolloutEngine:
    """The engine ``cfg`` (``grpo.rollout``) names."""
    return ENGINES[cfg.engine](cfg)

"""Kimi-Audio (moonshotai/Kimi-Audio-7B-Instruct), implemented in the project: no remote code.

Importing this package registers the ``kimi_audio`` backbone. Parts: ``config`` (our config class),
``model`` (the LM with the official tensor names), ``whisper`` (the Whisper-large-v3 front end),
``glm_tokenizer`` (GLM-4-Voice semantic tokens), ``text_tokenizer`` (tiktoken.model), ``processor``
(the two-stream prompt), ``audio_lm`` (LM + encoder, release-layout load/save), ``tiny`` (a tiny
release writer) and ``checkpoint`` (the names/shapes check behind ``python -m aqa.check_checkpoint``).
"""

from aqa.backbones.kimi_audio.backbone import KimiAudioBackbone
from aqa.backbones.kimi_audio.tiny import TinyKimiAudioSpec, write_tiny_kimi_audio

__all__ = ["KimiAudioBackbone", "TinyKimiAudioSpec", "write_tiny_kimi_audio"]

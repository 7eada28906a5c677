"""A text-only chat LLM over detected sound events, behind the backbone protocol: the cascade's answerer.

transformers' causal LM (``Qwen2ForCausalLM``: Qwen2.5-7B-Instruct in real use, a tiny one from
``python -m aqa.tiny text_llm`` in tests and the demo) and its tokenizer, loaded from a local directory
(safetensors only, no remote code). It reads no audio: ``feature_settings()`` is empty, so the scripts
decode no clip. The clip reaches the model as text, the events ``data_prep.sed_events`` wrote into
``meta.events``. A prompt is the checkpoint's own chat template around one user turn::

    <|im_start|>system ...<|im_end|>          (the template's default system turn)
    <|im_start|>user
    Sound events detected in the audio:       prompt.events_header
    0.1-0.7 s: Dog bark (0.93)                prompt.event_format, one line per event by onset
    (or prompt.no_events_text)
                                              (the events block is left out with prompt.events: false)
    What is heard first?                      prompt.template: question and lettered options
    (A) ...<|im_end|>
    <|im_start|>assistant

The events come before the question so the K option orders of a question share everything up to the
options. Collate, option logits, generation and GRPO log-probs are
:class:`~aqa.backbones.chat_lm.ChatLMBackbone`'s, the same code Qwen2-Audio runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aqa.backbones.base import register
from aqa.backbones.chat_lm import ASSISTANT_START, ChatLMBackbone, system_turn, unwrap
from aqa.backbones.text_llm_tiny import TinyQwen2TextSpec, write_tiny_text_llm
from aqa.data.example import Example
from aqa.data.prompts import PromptConfig, render_event, render_events, render_question

LM_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def user_text(ex: Example, choices: list[str], cfg: PromptConfig) -> str:
    """The user turn: the events block (unless ``cfg.events`` is off), a blank line, the question and options."""
    question = render_question(ex.question, choices, cfg)
    if not cfg.events:
        return question
    events = ex.meta.get("events")
    if events is None:
        raise ValueError(
            f"example {ex.id} has no meta.events. Point data_dir at a manifest written by `python -m "
            "data_prep.sed_events ... --out DIR`, or set prompt.events=false to ask without events."
        )
    if not isinstance(events, list):
        raise ValueError(f"example {ex.id}: meta.events must be a list of {{label, onset, offset, score}}, "
                         f"got {type(events).__name__}.")
    return f"{render_events(events, cfg)}\n\n{question}"


@register
class TextLLMBackbone(ChatLMBackbone):
    name = "text_llm"
    # None claimed: it loads any text causal LM transformers knows, and a 'qwen2' or 'llama' config.json
    # does not say the checkpoint is meant as the cascade's answerer, so aqa.export asks for --backbone.
    model_types = ()
    tiny_spec_class = TinyQwen2TextSpec
    tiny_writer = staticmethod(write_tiny_text_llm)

    def __init__(self, model: nn.Module, tokenizer: Any, prompt: PromptConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt or PromptConfig()
        missing = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"the tokenizer lacks the ChatML tokens {missing}; text_llm needs a ChatML chat model "
                             "such as Qwen2.5-Instruct.")
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self._frame: tuple[str, str] | None = None  # chat template around the user text
        self._frame_system: str | None = None  # the prompt.system it was rendered with
        self._init_chat_state()
        # A bad event_format fails here, at start, not at the first clip that has events.
        render_event({"label": "Dog bark", "onset": 0.0, "offset": 1.0, "score": 0.5}, self.prompt)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=torch.float32, prompt=None) -> TextLLMBackbone:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"model directory {path} has no config.json. Point model_path at a text chat LLM such as "
                "Qwen2.5-7B-Instruct, or write a tiny one with `python -m aqa.tiny text_llm --out DIR`."
            )
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"{path} holds a '{model_type}' model, which is not a text causal LM that transformers "
                             "knows (no remote code is run): pick the matching backbone, e.g. qwen2_audio.")
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"{path} has no *.safetensors weights; only safetensors are loaded (never pickle). Convert the "
                "checkpoint with transformers' save_pretrained first."
            )
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not tokenizer.chat_template:
            raise ValueError(f"{path} has no chat template (chat_template.jinja or tokenizer_config.json): text_llm "
                             "renders prompts with the checkpoint's own template; use an -Instruct checkpoint.")
        return cls(model.to(device), tokenizer, prompt)

    def save_processor(self, out_dir: str | Path) -> None:
        self.tokenizer.save_pretrained(out_dir)

    def lora_target_modules(self, include_audio: bool = False, names: list[str] | None = None) -> str:
        """A regex on full module names: the decoder layers' linear layers (there is no audio side)."""
        if include_audio:
            raise ValueError("text_llm has no audio tower: set lora.include_audio=false.")
        lm_names = names or LM_LINEAR
        pattern = rf"model\.layers\.\d+\..*\.({'|'.join(map(re.escape, lm_names))})"
        hits = [n for n, m in unwrap(self.model).named_modules()
                if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
        if not hits:
            raise ValueError(f"LoRA targets {lm_names} match no linear layer of the language model.")
        return pattern

    def full_finetune_prefixes(self, include_audio: bool = False) -> list[str]:
        if include_audio:
            raise ValueError("text_llm has no audio tower: set full.include_audio=false.")
        return ["model.", "lm_head."]

    # -- prompts (the chat_lm hook; feature_settings / extract_features stay the protocol's empty ones) --
    def _chat_frame(self) -> tuple[str, str]:
        """The chat template rendered once around a placeholder user text: ``(head, tail)``.

        The template inserts the user text verbatim, so head + text + tail is what it would render for
        each question, without running Jinja K times per question.
        """
        if self._frame is None or self._frame_system != self.prompt.system:
            marker = "\x00USER_TEXT\x00"
            text = self.tokenizer.apply_chat_template(system_turn(self.prompt) + [{"role": "user", "content": marker}],
                                                      tokenize=False, add_generation_prompt=True)
            if text.count(marker) != 1 or not text.endswith(ASSISTANT_START):
                raise ValueError("the checkpoint's chat template must place the user text once and end with "
                                 f"{ASSISTANT_START!r} (ChatML).")
            head, tail = text.split(marker)
            self._frame, self._frame_system = (head, tail), self.prompt.system
        return self._frame

    def _chat_prefix(self, ex: Example, choices: list[str]) -> str:
        """Chat text up to and including the assistant start ``<|im_start|>assistant\\n``."""
        head, tail = self._chat_frame()
        return head + user_text(ex, choices, self.prompt) + tail

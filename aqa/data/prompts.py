"""Prompt text for a multiple-choice question. Letters are assigned here, after any option shuffling."""

from __future__ import annotations

import string
from dataclasses import dataclass

LETTERS = string.ascii_uppercase  # 26 options at most, which validation enforces


@dataclass
class PromptConfig:
    """How a question and its options become text. Every backbone renders through this."""

    # {question} and {options} are filled in; {options} is one line per option, formatted by option_format.
    template: str = "{question}\n{options}\nAnswer with the option's letter."
    option_format: str = "({letter}) {text}"  # one option line; fields: letter, text
    # The SFT target: the letter alone ("{letter}") or with its text ("({letter}) {text}").
    target_format: str = "{letter}"
    # The system turn's text (AudioMCQ's: "You are an audio understanding model that answers multiple choice
    # questions based on audio content."); None: the checkpoint chat template's own default. Chat-template backbones
    # only (kimi_audio's prompt has no system turn and refuses it).
    system: str | None = None
    # Text backbones (text_llm) read the clip as its detected sound events (``meta.events``, as written by
    # data_prep.sed_events) placed before the question; audio backbones ignore these five keys.
    events: bool = True  # false: the question and options alone (the cascade's no-events ablation)
    events_header: str = "Sound events detected in the audio:"  # the line above the event list
    event_format: str = "{onset:.1f}-{offset:.1f} s: {label} ({score:.2f})"  # fields: label onset offset score
    no_events_text: str = "No sound events were detected."  # a clip whose event list is empty
    max_events: int | None = None  # keep the N highest-scoring events (None: all), listed by onset


def letters_for(n: int) -> list[str]:
    """The first ``n`` option letters."""
    if not 1 <= n <= len(LETTERS):
        raise ValueError(f"{n} options cannot be lettered: 1 to {len(LETTERS)} are supported.")
    return list(LETTERS[:n])


def render_options(choices: list[str], cfg: PromptConfig) -> str:
    return "\n".join(cfg.option_format.format(letter=L, text=c) for L, c in zip(letters_for(len(choices)), choices))


def render_question(question: str, choices: list[str], cfg: PromptConfig) -> str:
    """The user text: the question and its lettered options, in the order given."""
    return cfg.template.format(question=question.strip(), options=render_options(choices, cfg))


def render_target(choices: list[str], answer_index: int, cfg: PromptConfig) -> str:
    """The assistant text that SFT trains on: the right letter, optionally followed by its text."""
    return cfg.target_format.format(letter=LETTERS[answer_index], text=choices[answer_index])


EVENT_FIELDS = ("label", "onset", "offset", "score")


def render_event(event: dict, cfg: PromptConfig) -> str:
    """One event ``{label, onset, offset, score}`` as a line of ``cfg.event_format``."""
    missing = [k for k in EVENT_FIELDS if k not in event]
    if missing:
        raise ValueError(f"sound event {event!r} lacks {missing}; events need {list(EVENT_FIELDS)} as "
                         "data_prep.sed_events writes them.")
    try:
        return cfg.event_format.format(**{k: event[k] for k in EVENT_FIELDS})
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"prompt.event_format {cfg.event_format!r} cannot format {event!r} ({err}); use the "
                         f"fields {{label}} {{onset}} {{offset}} {{score}}, e.g. '{{onset:.1f}}-{{offset:.1f}} s: "
                         "{label} ({score:.2f})'.") from err


def render_events(events: list[dict], cfg: PromptConfig) -> str:
    """The events block: the header, then one line per event by onset; ``no_events_text`` when there are none.

    With ``max_events`` only the N highest-scoring events are kept (a long clip can yield hundreds).
    """
    if cfg.max_events is not None and cfg.max_events < 0:
        raise ValueError(f"prompt.max_events must be >= 0 or null, got {cfg.max_events}.")
    kept = list(events)
    if cfg.max_events is not None and len(kept) > cfg.max_events:
        kept = sorted(kept, key=lambda e: -float(e.get("score", 0.0)))[: cfg.max_events]
    lines = [render_event(e, cfg) for e in sorted(kept, key=lambda e: (e.get("onset", 0.0), e.get("offset", 0.0)))]
    body = "\n".join(lines) if lines else cfg.no_events_text
    return f"{cfg.events_header}\n{body}" if cfg.events_header else body

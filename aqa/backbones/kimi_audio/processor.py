"""Kimi-Audio's two-stream prompt: text question, then audio, then the assistant's text.

Every position carries an audio-stream id (``input_ids``), a text-stream id (``text_input_ids``) and
an ``is_continuous`` bit marking where Whisper features are added. For a question Q (q text ids) and
the clip's GLM codes C (N of them) the inference prompt is (see ``kimi_audio_io.md``)::

    audio: user_start  blank*q  media_begin  offset+C  media_end  ct  msg_end  assistant_start
    text : blank       Q        blank        blank*N   blank      blank blank  blank
    cont : 0           0*q      0            1*N       0          0   0        0

and the teacher-forced SFT sample continues with the answer A in the text stream (audio blank),
then ``text_eos`` and a final ``msg_end``; the text loss covers A and ``text_eos``. All ids come from
the model config, so a tiny model with small ids builds the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aqa.backbones.kimi_audio.config import KimiAudioConfig


@dataclass(frozen=True)
class SpecialIds:
    """The prompt's special token ids, from :class:`KimiAudioConfig`."""

    msg_end: int
    media_begin: int
    media_end: int
    text_blank: int
    text_eos: int
    user_msg_start: int
    assistant_msg_start: int
    speech_ct: int
    pad: int
    token_offset: int  # audio-stream id of GLM code c is token_offset + c

    @classmethod
    def from_config(cls, config: KimiAudioConfig) -> SpecialIds:
        return cls(
            msg_end=config.kimia_msg_end, media_begin=config.kimia_media_begin, media_end=config.kimia_media_end,
            text_blank=config.kimia_text_blank, text_eos=config.kimia_text_eos,
            user_msg_start=config.kimia_user_msg_start, assistant_msg_start=config.kimia_assistant_msg_start,
            speech_ct=config.kimia_speech_ct_id, pad=config.pad_token_id, token_offset=config.kimia_token_offset,
        )


@dataclass
class TwoStream:
    """One sequence of the two-stream layout; all lists have the same length."""

    audio_ids: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    is_continuous: list[int] = field(default_factory=list)
    text_loss_mask: list[int] = field(default_factory=list)  # input-aligned: 1 where the text id is a target

    def add(self, audio: list[int], text: list[int], continuous: int = 0, loss: int = 0) -> None:
        if len(audio) != len(text):
            raise ValueError(f"stream lengths differ: {len(audio)} audio vs {len(text)} text ids.")
        self.audio_ids += audio
        self.text_ids += text
        self.is_continuous += [continuous] * len(audio)
        self.text_loss_mask += [loss] * len(audio)

    def __len__(self) -> int:
        return len(self.audio_ids)


def user_turn(question_ids: list[int], codes: list[int], ids: SpecialIds) -> TwoStream:
    """The user's text message then audio message, ending with ``msg_end`` (output type "text").

    ``codes``: the clip's GLM codes in ``[0, codebook)``; they are shifted by ``token_offset``.
    """
    if not codes:
        raise ValueError("the clip has no semantic tokens: every question needs audio (check the clip's length).")
    blank = ids.text_blank
    s = TwoStream()
    s.add([ids.user_msg_start], [blank])
    s.add([blank] * len(question_ids), list(question_ids))
    s.add([ids.media_begin], [blank])
    s.add([ids.token_offset + int(c) for c in codes], [blank] * len(codes), continuous=1)
    s.add([ids.media_end], [blank])
    # the last message before the role change carries the ct token (text output) and msg_end
    s.add([ids.speech_ct], [blank])
    s.add([ids.msg_end], [blank])
    return s


def inference_prompt(question_ids: list[int], codes: list[int], ids: SpecialIds,
                     lead_ids: list[int] | None = None) -> TwoStream:
    """User turn + ``assistant_msg_start``, then ``lead_ids`` (the target's text before the letter,
    for scoring) in the text stream. The next text token is predicted at the last position."""
    s = user_turn(question_ids, codes, ids)
    s.add([ids.assistant_msg_start], [ids.text_blank])
    if lead_ids:
        s.add([ids.text_blank] * len(lead_ids), list(lead_ids))
    return s


def training_sample(question_ids: list[int], codes: list[int], answer_ids: list[int], ids: SpecialIds) -> TwoStream:
    """The teacher-forced sample: prompt, the answer and ``text_eos`` (the loss targets), ``msg_end``."""
    if not answer_ids:
        raise ValueError("the assistant answer is empty: prompt.target_format renders no text.")
    s = user_turn(question_ids, codes, ids)
    s.add([ids.assistant_msg_start], [ids.text_blank])
    s.add([ids.text_blank] * len(answer_ids), list(answer_ids), loss=1)
    s.add([ids.text_blank], [ids.text_eos], loss=1)
    s.add([ids.msg_end], [ids.text_blank])
    return s

"""Scenes and questions of the synthetic data set, one builder per question type.

A builder first draws which option index will be right (from a balanced deck per type and option count,
so every letter is right equally often), then builds a scene whose true answer lands there. Most types
list options in a fixed canonical order (yes/no, catalogue order, numbers), which a tiny model learns
quickly; ``event_order`` shuffles permutations and is the deliberately hard minority.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aqa.data.synth_sounds import CATALOGUE, CONTOURS, EVENTS, SPECIES, Sound

YES_NO = ["Yes", "No"]

PHRASES = {
    "species_id": ["Which species is calling in this recording?", "Which animal produces these calls?"],
    "species_presence": ["Is {a} {x} calling in this recording?", "Can you hear {a} {x} in this recording?"],
    "call_shape": ["How does the pitch of the call change?", "Which word describes the pitch of the call?"],
    "call_count": ["How many calls does the animal make?", "How many times does the animal call?"],
    "event_presence": ["Is there {a} {x} in this recording?", "Can you hear {a} {x}?"],
    "event_count": ["How many sound events occur in this recording?", "How many separate sounds do you hear?"],
    "first_event": ["Which sound occurs first?", "What is the first sound you hear?"],
    "longest_event": ["Which sound lasts the longest?", "Which sound has the longest duration?"],
    "event_order": ["In what order do the sounds occur?", "Which sequence matches the order of the sounds?"],
    "animal_presence": ["Is an animal calling in this recording?", "Does this recording contain an animal call?"],
    "louder": ["Which is louder, the {x} or the {y}?", "Which sound is louder: the {x} or the {y}?"],
    "higher": ["Which is higher in pitch, the {x} or the {y}?", "Which sound is higher: the {x} or the {y}?"],
    "first_sound": ["Which comes first, the {x} or the {y}?", "Which do you hear first: the {x} or the {y}?"],
    "which_heard": ["Which of these sounds can be heard in the recording?", "Which sound is present?"],
}


@dataclass
class Placed:
    """One sound instance in a clip: the ground truth behind answers and the strong-label TSV."""

    sound: Sound
    onset: float  # seconds
    offset: float  # seconds
    level_db: float  # dB RMS re full scale


@dataclass
class SynthQA:
    """A question with its scene, before any file is written."""

    question_type: str
    question: str
    choices: list[str]
    answer_index: int
    seconds: float  # clip length
    events: list[Placed] = field(default_factory=list)


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


class SceneBuilder:
    """Random draws shared by all builders: balanced answer positions, durations, levels, layout."""

    def __init__(self, rng: np.random.Generator, cfg: Any):
        self.rng = rng
        self.cfg = cfg
        self._decks: dict[tuple[str, int], list[int]] = {}

    def pick(self, qtype: str, n: int) -> int:
        """The right option's index among ``n``, drawn without replacement from a refilled deck."""
        deck = self._decks.setdefault((qtype, n), [])
        if not deck:
            deck.extend(int(i) for i in self.rng.permutation(n))
        return deck.pop()

    def phrase(self, qtype: str, **names: str) -> str:
        options = PHRASES[qtype]
        text = options[int(self.rng.integers(len(options)))]
        if "x" in names:
            names.setdefault("a", article(names["x"]))
        return text.format(**names)

    def uniform(self, bounds: list[float]) -> float:
        return float(self.rng.uniform(bounds[0], bounds[1]))

    def level(self) -> float:
        return round(self.uniform(self.cfg.level_db), 1)

    def layout(self, items: list[tuple[Sound, float, float]]) -> tuple[float, list[Placed]]:
        """Place ``(sound, seconds, level_db)`` items in the given order, never overlapping.

        Gaps of at least ``min_gap_s`` keep onsets countable and orders unambiguous; the slack of a
        clip drawn from ``clip_seconds`` is spread randomly over the gaps. Times are rounded to 1 ms so
        the TSV and the samples agree exactly.
        """
        cfg = self.cfg
        durs = [round(d, 3) for _, d, _ in items]
        need = sum(durs) + (len(items) - 1) * cfg.min_gap_s + 2 * cfg.margin_s
        seconds = max(self.uniform(cfg.clip_seconds), need)
        slack = self.rng.dirichlet(np.ones(len(items) + 1)) * (seconds - need)
        placed, t = [], cfg.margin_s
        for i, ((sound, _, level), dur) in enumerate(zip(items, durs)):
            onset = round(t + slack[i], 3)
            placed.append(Placed(sound, onset, round(onset + dur, 3), level))
            t = placed[-1].offset + cfg.min_gap_s
        # Whole centiseconds (an integer sample count) that still leave the closing margin.
        seconds = math.ceil(round(max(seconds, placed[-1].offset + cfg.margin_s) * 100, 6)) / 100
        return seconds, placed

    def calls(self, sound: Sound, count: int) -> list[tuple[Sound, float, float]]:
        """``count`` calls of one species, one level for the whole bout."""
        level = self.level()
        return [(sound, self.uniform(self.cfg.call_seconds), level) for _ in range(count)]

    def event(self, sound: Sound, long: bool = False) -> tuple[Sound, float, float]:
        bounds = self.cfg.long_event_seconds if long else self.cfg.event_seconds
        return (sound, self.uniform(bounds), self.level())

    def choice(self, seq, size: int | None = None, replace: bool = False):
        idx = self.rng.choice(len(seq), size=size, replace=replace)
        return seq[int(idx)] if size is None else [seq[int(i)] for i in idx]

    def shuffled(self, items: list) -> list:
        return [items[int(i)] for i in self.rng.permutation(len(items))]


def _qa(b: SceneBuilder, qtype: str, question: str, choices: list[str], k: int, items) -> SynthQA:
    seconds, placed = b.layout(items)
    return SynthQA(qtype, question, choices, k, seconds, placed)


# ---- part bqa: one species per clip, 1-3 calls -------------------------------------------------

def species_id(b: SceneBuilder) -> SynthQA:
    k = b.pick("species_id", len(SPECIES))
    count = int(b.rng.integers(1, 4))
    return _qa(b, "species_id", b.phrase("species_id"), [s.name for s in SPECIES], k, b.calls(SPECIES[k], count))


def species_presence(b: SceneBuilder) -> SynthQA:
    k = b.pick("species_presence", 2)
    asked = b.choice(SPECIES)
    present = asked if k == 0 else b.choice([s for s in SPECIES if s != asked])
    items = b.calls(present, int(b.rng.integers(1, 4)))
    return _qa(b, "species_presence", b.phrase("species_presence", x=asked.name), list(YES_NO), k, items)


def call_shape(b: SceneBuilder) -> SynthQA:
    k = b.pick("call_shape", len(CONTOURS))
    sound = next(s for s in SPECIES if s.contour == CONTOURS[k])
    items = b.calls(sound, int(b.rng.integers(1, 4)))
    return _qa(b, "call_shape", b.phrase("call_shape"), list(CONTOURS), k, items)


def call_count(b: SceneBuilder) -> SynthQA:
    k = b.pick("call_count", 3)
    items = b.calls(b.choice(SPECIES), k + 1)
    return _qa(b, "call_count", b.phrase("call_count"), ["1", "2", "3"], k, items)


# ---- part tsqa: 2-4 non-overlapping events ------------------------------------------------------

def event_presence(b: SceneBuilder) -> SynthQA:
    k = b.pick("event_presence", 2)
    asked = b.choice(EVENTS)
    others = [e for e in EVENTS if e != asked]
    n = int(b.rng.integers(2, 5))
    sounds = b.choice(others, size=n, replace=True)
    if k == 0:
        sounds[int(b.rng.integers(n))] = asked
    items = [b.event(s) for s in sounds]
    return _qa(b, "event_presence", b.phrase("event_presence", x=asked.name), list(YES_NO), k, items)


def event_count(b: SceneBuilder) -> SynthQA:
    k = b.pick("event_count", 3)
    items = [b.event(s) for s in b.choice(EVENTS, size=k + 2, replace=True)]
    return _qa(b, "event_count", b.phrase("event_count"), ["2", "3", "4"], k, items)


def _distinct_events(b: SceneBuilder, qtype: str) -> tuple[int, list[Sound]]:
    """(right index, distinct events in canonical order) for questions whose options are the events."""
    n = int(b.rng.integers(2, 5))
    k = b.pick(qtype, n)
    picked = sorted(b.choice(EVENTS, size=n), key=EVENTS.index)
    return k, picked


def first_event(b: SceneBuilder) -> SynthQA:
    k, sounds = _distinct_events(b, "first_event")
    rest = b.shuffled([s for i, s in enumerate(sounds) if i != k])
    items = [b.event(s) for s in [sounds[k], *rest]]
    return _qa(b, "first_event", b.phrase("first_event"), [s.name for s in sounds], k, items)


def longest_event(b: SceneBuilder) -> SynthQA:
    k, sounds = _distinct_events(b, "longest_event")
    items = b.shuffled([b.event(s, long=(i == k)) for i, s in enumerate(sounds)])
    return _qa(b, "longest_event", b.phrase("longest_event"), [s.name for s in sounds], k, items)


def event_order(b: SceneBuilder) -> SynthQA:
    n = int(b.rng.integers(2, 4))
    order = b.choice(EVENTS, size=n)
    perms = [list(p) for p in itertools.permutations(order)]
    n_opt = min(4, len(perms))
    k = b.pick("event_order", n_opt)
    wrong = b.shuffled(perms[1:])[: n_opt - 1]  # perms[0] is the true order
    options = wrong[:k] + [perms[0]] + wrong[k:]
    text = [", then ".join(s.name for s in p) for p in options]
    return _qa(b, "event_order", b.phrase("event_order"), text, k, [b.event(s) for s in order])


# ---- part cqa: species calls mixed with events --------------------------------------------------

def animal_presence(b: SceneBuilder) -> SynthQA:
    k = b.pick("animal_presence", 2)
    if k == 0:
        items = b.calls(b.choice(SPECIES), int(b.rng.integers(1, 3))) + [b.event(b.choice(EVENTS))]
    else:
        items = [b.event(s) for s in b.choice(EVENTS, size=int(b.rng.integers(1, 3)))]
    return _qa(b, "animal_presence", b.phrase("animal_presence"), list(YES_NO), k, b.shuffled(items))


def louder(b: SceneBuilder) -> SynthQA:
    k = b.pick("louder", 2)
    species, event = b.choice(SPECIES), b.choice(EVENTS)
    loud = b.uniform(b.cfg.loud_level_db)
    quiet = loud - b.cfg.louder_gap_db
    items = [
        (species, b.uniform(b.cfg.call_seconds), loud if k == 0 else quiet),
        (event, b.uniform(b.cfg.event_seconds), quiet if k == 0 else loud),
    ]
    question = b.phrase("louder", x=species.name, y=event.name)
    return _qa(b, "louder", question, [species.name, event.name], k, b.shuffled(items))


def higher(b: SceneBuilder) -> SynthQA:
    k = b.pick("higher", 2)
    pairs = [(s, e) for s in SPECIES for e in EVENTS if (s.pitch_hz > e.pitch_hz) == (k == 0)]
    species, event = b.choice(pairs)
    items = b.shuffled([b.calls(species, 1)[0], b.event(event)])
    question = b.phrase("higher", x=species.name, y=event.name)
    return _qa(b, "higher", question, [species.name, event.name], k, items)


def first_sound(b: SceneBuilder) -> SynthQA:
    k = b.pick("first_sound", 2)
    species, event = b.choice(SPECIES), b.choice(EVENTS)
    items = [b.calls(species, 1)[0], b.event(event)]
    question = b.phrase("first_sound", x=species.name, y=event.name)
    return _qa(b, "first_sound", question, [species.name, event.name], k, items if k == 0 else items[::-1])


def which_heard(b: SceneBuilder) -> SynthQA:
    k = b.pick("which_heard", 4)
    options = sorted(b.choice(CATALOGUE, size=4), key=CATALOGUE.index)
    sound = options[k]
    items = b.calls(sound, int(b.rng.integers(1, 3))) if sound.kind == "species" else [b.event(sound)]
    return _qa(b, "which_heard", b.phrase("which_heard"), [s.name for s in options], k, items)


BUILDERS: dict[str, dict[str, Callable[[SceneBuilder], SynthQA]]] = {
    "bqa": {f.__name__: f for f in (species_id, species_presence, call_shape, call_count)},
    "tsqa": {f.__name__: f for f in (event_presence, event_count, first_event, longest_event, event_order)},
    "cqa": {f.__name__: f for f in (animal_presence, louder, higher, first_sound, which_heard)},
}

"""The SED label map: predictor row -> AudioSet MID -> display name, stored as ``labels.json``.

Official BEATs checkpoints carry a ``label_dict`` {predictor row: MID} whose order is *not* that of
AudioSet's ``class_labels_indices.csv``, so rows are never assumed to follow that file: the map is
always built from the checkpoint's own ``label_dict``, and names are looked up by MID.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aqa.errors import UserError

LABELS_FILE = "labels.json"


class LabelMapError(UserError, ValueError):
    """A label map that does not fit the model or cannot be read; the message says what to pass."""


@dataclass(frozen=True)
class SoundClass:
    index: int  # predictor row
    mid: str  # AudioSet machine id, e.g. /m/0bt9lr
    name: str  # display name, e.g. Dog


class LabelMap:
    """The classes of a SED model in predictor-row order."""

    def __init__(self, classes: list[SoundClass]):
        for i, c in enumerate(classes):
            if c.index != i:
                raise LabelMapError(f"label map entry {i} has index {c.index}; rows must be 0..{len(classes) - 1}.")
        mids = [c.mid for c in classes]
        dup = sorted({m for m in mids if mids.count(m) > 1})
        if dup:
            raise LabelMapError(f"label map names MIDs more than once: {dup[:5]}.")
        self.classes = list(classes)
        self._by_mid = {c.mid: c for c in classes}

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        return iter(self.classes)

    def __getitem__(self, index: int) -> SoundClass:
        return self.classes[index]

    @property
    def mids(self) -> list[str]:
        return [c.mid for c in self.classes]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def index_of(self, mid: str) -> int | None:
        c = self._by_mid.get(mid)
        return None if c is None else c.index

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]]) -> LabelMap:
        """``[(mid, name)]`` in row order."""
        return cls([SoundClass(i, m, n) for i, (m, n) in enumerate(pairs)])

    @classmethod
    def from_label_dict(cls, label_dict: dict[Any, str], names: dict[str, str] | None = None) -> LabelMap:
        """A checkpoint's ``label_dict`` ({row: MID}, keys int or numeric str) with names by MID.

        MIDs without a name keep the MID as their name (the caller reports how many).
        """
        try:
            rows = {int(k): str(v) for k, v in label_dict.items()}
        except (TypeError, ValueError) as err:
            raise LabelMapError(f"label_dict keys must be predictor rows (integers): {err}") from err
        if sorted(rows) != list(range(len(rows))):
            raise LabelMapError(f"label_dict rows are not 0..{len(rows) - 1} (got {len(rows)} keys, "
                                f"min {min(rows, default=None)}, max {max(rows, default=None)}).")
        names = names or {}
        return cls([SoundClass(i, rows[i], names.get(rows[i], rows[i])) for i in range(len(rows))])

    def check_classes(self, n_classes: int, where: str) -> None:
        """The predictor of ``where`` has ``n_classes`` rows: it must equal the label count."""
        if n_classes != len(self):
            raise LabelMapError(
                f"{where} predicts {n_classes} classes but its label map has {len(self)}: the checkpoint and "
                "labels.json belong to different models. Convert the checkpoint again with python -m "
                "aqa.sed.convert (which reads its own label_dict), or use the labels.json written with it."
            )

    def to_json(self) -> dict[str, Any]:
        return {"labels": [{"index": c.index, "mid": c.mid, "name": c.name} for c in self.classes]}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / LABELS_FILE
        path.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        from aqa.sed.config import read_sed_json

        path, data = read_sed_json(path, LABELS_FILE, LabelMapError, "label map",
                                   "written by python -m aqa.sed.convert, aqa.sed.tiny or train/sed.py")
        try:
            return cls([SoundClass(int(e["index"]), str(e["mid"]), str(e["name"])) for e in data["labels"]])
        except (KeyError, TypeError) as err:
            raise LabelMapError(f"{path} must hold {{'labels': [{{'index', 'mid', 'name'}}, ...]}}: {err}") from err


def read_display_names(path: str | Path) -> dict[str, str]:
    """MID -> display name from AudioSet's ``class_labels_indices.csv`` (``index,mid,display_name``) or a
    ``mid_to_display_name.tsv`` (``mid<TAB>name``, as AudioSet-Strong ships it)."""
    path = Path(path)
    if not path.is_file():
        raise LabelMapError(f"display-name file {path} does not exist; pass class_labels_indices.csv or "
                            "mid_to_display_name.tsv.")
    text = path.read_text(encoding="utf-8")
    names: dict[str, str] = {}
    if path.suffix == ".csv":
        for row in csv.DictReader(text.splitlines()):
            if "mid" not in row or "display_name" not in row:
                raise LabelMapError(f"{path} needs the header index,mid,display_name.")
            names[row["mid"].strip()] = row["display_name"].strip()
    else:  # the AudioSet-Strong TSV, read as the temporal-QA converter reads it
        from aqa.data.temporal_qa import AnnotationError, read_label_map

        try:
            names = read_label_map(path)
        except AnnotationError as err:
            raise LabelMapError(str(err)) from None
    if not names:
        raise LabelMapError(f"{path} holds no names.")
    return names

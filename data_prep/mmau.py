"""MMAU test-mini to a manifest (part ``mmau``).

    python -m data_prep.mmau --src mmau-test-mini.json --audio-root DIR --out DIR [--split dev]

``audio_id`` (``./test-mini-audios/<id>.wav``) is found under ``--audio-root`` by path, else by file
name; items without audio are quarantined. ``category`` lists are normalised; task, category,
sub-category, difficulty and source data set go to ``meta``. Answers are known, so the default split
is ``dev`` (inference then reports accuracy). Items with repeated option texts are kept in dev and eval
(scored by text) and quarantined in train. Writes ``OUT/<split>.jsonl`` (even when empty),
``OUT/quarantine.jsonl`` and ``OUT/dataset.json``; exit status 2 when the file cannot be read or
nothing is kept. Logic lives in ``aqa.data.sources.mmau``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aqa.data.convert import converter_parser, run_cli
from aqa.data.manifest import SPLITS
from aqa.data.sources.mmau import convert_mmau


def main(argv: list[str] | None = None) -> int:
    parser = converter_parser("python -m data_prep.mmau", __doc__)
    parser.add_argument("--src", required=True, type=Path, help="mmau-test-mini.json")
    parser.add_argument("--audio-root", required=True, type=Path, help="folder holding the test-mini audio")
    parser.add_argument("--split", choices=SPLITS, default="dev", help="split to write (default: dev)")
    args = parser.parse_args(argv)
    return run_cli(lambda: convert_mmau(
        args.src, args.audio_root, args.out, split=args.split, progress=not args.no_progress
    ))


if __name__ == "__main__":
    sys.exit(main())

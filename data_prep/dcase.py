"""Official DCASE 2025 Task 5 question files to a manifest.

    python -m data_prep.dcase --src DIR_OR_FILE --audio-root DIR --split {train,dev,eval} \\
        [--part bqa|tsqa|cqa] --out DIR

``--src`` is a folder of per-question JSON files (id = file stem), or one JSON list or JSONL file with
the same fields (``audio_url``, ``question``, ``choice``, ``answer``, optional ``question_type``).
``audio_url`` is found under ``--audio-root`` (default: ``--src``) by path, else by file name.
Without ``--split``/``--part`` they are read from folder names under ``--src`` (``raw/bqa/dev/...``).

Writes ``OUT/<split>.jsonl`` (every split the run owns, even when empty, so no stale file survives),
``OUT/quarantine.jsonl`` (each rejected question with its reason) and ``OUT/dataset.json``. Runs for
other splits into the same ``--out`` are kept. Exit status 2 when the input cannot be read or nothing
is kept. Logic lives in ``aqa.data.sources.dcase``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aqa.data.convert import converter_parser, run_cli
from aqa.data.manifest import SPLITS
from aqa.data.sources.dcase import PARTS, convert_dcase


def main(argv: list[str] | None = None) -> int:
    parser = converter_parser("python -m data_prep.dcase", __doc__)
    parser.add_argument("--src", required=True, type=Path, help="folder of question JSON files, or one JSON/JSONL")
    parser.add_argument("--audio-root", type=Path, default=None, help="folder holding the audio (default: --src)")
    parser.add_argument("--split", choices=SPLITS, default=None, help="split of every question (default: folder names)")
    parser.add_argument("--part", choices=PARTS, default=None, help="part of every question (default: folder names)")
    args = parser.parse_args(argv)
    return run_cli(lambda: convert_dcase(
        args.src, args.out, audio_root=args.audio_root, split=args.split, part=args.part,
        progress=not args.no_progress,
    ))


if __name__ == "__main__":
    sys.exit(main())

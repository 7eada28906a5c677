"""Option-reading questions for the tiny backbones' pretraining stage ("Which option says "hiss"?").

    python -m data_prep.option_reading --out data/demo_reading --words-from data/demo
                                       [--split NAME=N@SECONDS[,SECONDS...] ...] [--event-labels TSV]
                                       [--min-options 2] [--max-options 5] [--seed 0]

Writes ``OUT/<split>.jsonl`` (one record per question, options in random order, the answer named in the
question), ``OUT/audio/`` (one silent clip per length) and ``OUT/dataset.json``. The words are those of the
option texts of ``--words-from``'s train split. Default splits: train_short=8000@0.1 and dev_short=256@0.1
(a 0.1 s clip, what the demo's reading stages train and evaluate on), train=4000@2.5 and dev=256@2.5 (2.5 s, as
long as the demo's soundscapes, for a second stage beside them; the demo no longer runs one: README). With
``--event-labels``, every question also carries 0-4 made-up detected events (``meta.events``) for the cascade's
text LLM. The same arguments give the same bytes. See aqa/data/option_reading.py for why the stage exists.
"""

from __future__ import annotations

import sys

from aqa.data.convert import ConversionError, converter_parser, run_cli
from aqa.data.manifest import ManifestError
from aqa.data.option_reading import ReadingConfig, ReadingSplit, build, option_words
from aqa.data.temporal_qa import read_label_map


def main(argv: list[str] | None = None) -> int:
    parser = converter_parser("python -m data_prep.option_reading", __doc__)
    parser.add_argument("--words-from", required=True, help="manifest directory whose train options give the words")
    parser.add_argument("--split", action="append", default=None, metavar="NAME=N@SECONDS[,SECONDS...]",
                        help="a split of N questions on silent clips of these lengths, in turn (repeatable)")
    parser.add_argument("--min-options", type=int, default=2)
    parser.add_argument("--max-options", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--event-labels", default=None, metavar="TSV",
                        help="an AudioSet-style label map (mid<TAB>name): give each question 0-4 made-up detected "
                             "events from these labels (meta.events), for a text LLM that reads events")
    args = parser.parse_args(argv)
    try:
        splits = [ReadingSplit.parse(s) for s in args.split] if args.split else ReadingConfig().splits
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def run() -> None:
        try:
            cfg = ReadingConfig(splits=splits, min_options=args.min_options, max_options=args.max_options,
                                seed=args.seed,
                                event_labels=list(read_label_map(args.event_labels).values()) if args.event_labels else [])
            words = option_words(args.words_from)
            counts = build(args.out, words, cfg)
        except (ManifestError, ValueError) as err:
            raise ConversionError(str(err)) from err
        print(f"wrote {args.out}: " + ", ".join(f"{name} {n}" for name, n in counts.items())
              + f" questions over {len(words)} words")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())

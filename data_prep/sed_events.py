"""Sound events from the calibrated SED into a manifest's ``meta.events``.

    python -m data_prep.sed_events --manifest data/demo/dev.jsonl --sed DIR --calibration calibration.json \\
        --out data/demo_events [--config configs/cascade/events.yaml] [--cache-dir DIR] [key=value ...]
    python -m data_prep.sed_events --manifest data/demo/dev.jsonl --events OUT/events/dev.jsonl --out DIR

``--calibration none`` keeps the SED's own probabilities (for comparison). ``--events`` attaches events
computed before (an ``events/<split>.jsonl`` this command wrote) instead of running the SED; ids must
match the manifest both ways. See :mod:`aqa.sed.annotate` for the files written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aqa.config import load_config
from aqa.data.manifest import load_manifest
from aqa.errors import UserError
from aqa.sed.annotate import SedEventsConfig, detect_events, read_events_file, write_annotated
from aqa.sed.calibrate import resolve_device

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cascade" / "events.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="input manifest JSONL (dataset.json beside it)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sed", help="SED directory (config.json, model.safetensors, labels.json)")
    source.add_argument("--events", help="events JSONL written by an earlier run, attached without the SED")
    parser.add_argument("--calibration", help="calibration.json of python -m aqa.sed.calibrate, or 'none'")
    parser.add_argument("--out", required=True, help="output directory for the annotated manifest")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="posteriors + event decoding settings")
    parser.add_argument("--cache-dir", default=None, help="per-clip cache of segment logits (default OUT/.sed_cache)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. events.threshold=0.2")
    args = parser.parse_args(argv)
    if args.sed and not args.calibration:
        parser.error("--sed needs --calibration calibration.json (or --calibration none for raw probabilities)")
    try:
        if args.events:
            records = load_manifest(args.manifest).records
            events, notes = read_events_file(args.events)
            summary = {"events_file": args.events, "events": sum(len(v) for v in events.values())}
        else:
            cfg = load_config(SedEventsConfig, args.config, args.overrides)
            calibration = None if args.calibration.lower() == "none" else args.calibration
            cache = args.cache_dir or str(Path(args.out) / ".sed_cache")
            records, events, notes, summary = detect_events(args.manifest, args.sed, calibration, cfg, cache,
                                                            resolve_device(cfg.device, cfg.cpu_threads))
        target = write_annotated(args.manifest, records, events, notes, args.out, summary)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    n_events = sum(len(v) for v in events.values())
    print(f"wrote {target}: {len(records)} records, {n_events} events"
          + (f", {len(notes)} with a note (clip too short)" if notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

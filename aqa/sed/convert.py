"""Convert an official BEATs checkpoint (``.pt``) into a SED directory of safetensors + JSON.

    python -m aqa.sed.convert BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt --out models/beats_as2m \\
        [--names class_labels_indices.csv]

Writes ``model.safetensors``, ``config.json`` (the checkpoint's ``cfg``) and ``labels.json`` (predictor
row -> MID through the checkpoint's own ``label_dict`` -> display name from ``--names``). The file is read
with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import argparse
import sys

from aqa.errors import UserError
from aqa.sed.labels import read_display_names
from aqa.sed.weights import convert_official


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Official BEATs .pt -> safetensors SED directory.")
    parser.add_argument("checkpoint", help="official BEATs checkpoint (.pt) with cfg, model and label_dict")
    parser.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, labels.json)")
    parser.add_argument("--names", default=None,
                        help="AudioSet class_labels_indices.csv or mid_to_display_name.tsv, for display names")
    args = parser.parse_args(argv)
    try:
        names = read_display_names(args.names) if args.names else None
        summary = convert_official(args.checkpoint, args.out, names)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {summary['tensors']} tensors, {summary['classes']} classes")
    if summary["classes"] and summary["named"] < summary["classes"]:
        print(f"note: {summary['classes'] - summary['named']} classes have no display name and are named by MID"
              + ("" if args.names else "; pass --names class_labels_indices.csv"))
    if summary["ignored_cfg_keys"]:
        print(f"note: cfg keys not used by this BEATs: {', '.join(summary['ignored_cfg_keys'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

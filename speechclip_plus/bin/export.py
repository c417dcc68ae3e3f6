"""Export a trained experiment as one self-contained model file (for the Python API and SUPERB).

    python -m speechclip_plus.bin.export --exp_dir exp/<tag> [--checkpoint best|last|<path>] \\
        --out exp/<tag>/model.pt

The file holds the resolved config, the keyword vocabulary, every weight (frozen CLIP and upstream included)
and the upstream checkpoint the model was built from, as plain tensors and containers only: it loads with
``torch.load(weights_only=True)`` and rebuilds the model on a machine without the exp dir
(``speechclip_plus.api.read_model_file`` documents the layout). Written atomically.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

log = logging.getLogger("speechclip_plus.export")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp_dir", required=True, help="experiment dir (config.yaml, checkpoints/)")
    parser.add_argument("--checkpoint", default="best", help="best | last | path of a checkpoint (default: best)")
    parser.add_argument("--out", required=True, help="output model file (e.g. exp/<tag>/model.pt)")
    parser.add_argument("--dry_run", action="store_true", help="check the inputs, write nothing")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (export) %(levelname)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..api import ModelFileError, exp_config, export_model, load_exp_dir, resolve_checkpoint

    try:
        if args.dry_run:
            exp_config(args.exp_dir)
            log.info("dry run: would export %s -> %s", resolve_checkpoint(args.exp_dir, args.checkpoint), args.out)
            return 0
        model, cfg, meta = load_exp_dir(args.exp_dir, args.checkpoint)
        step = meta.get("step")
        meta = {"checkpoint": os.path.basename(meta["checkpoint"]), "step": None if step is None else int(step),
                "exp": os.path.basename(os.path.abspath(args.exp_dir))}
        export_model(model, cfg, args.out, meta=meta)
    except (ModelFileError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_params = sum(p.numel() for p in model.parameters())
    log.info("exported %s (step %s, %s parameters, %.1f MB) -> %s", args.exp_dir, meta["step"], f"{n_params:,}",
             os.path.getsize(args.out) / 2**20, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a trained experiment as one self-contained model file (for the Python API and SUPERB).

    python -m speechclip_plus.bin.export --exp_dir exp/<tag> [--checkpoint best|last|<path>] \\
        --out exp/<tag>/model.pt [--push_to_hub ORG/NAME [--hub_private] [--hub_commit_message MSG]]

The file holds the resolved config, the keyword vocabulary, every weight (frozen CLIP and upstream included)
and the upstream checkpoint the model was built from, as plain tensors and containers only: it loads with
``torch.load(weights_only=True)`` and rebuilds the model on a machine without the exp dir
(``speechclip_plus.model_file`` documents the layout). Written atomically.

--push_to_hub uploads the written file as ``model.pt`` and a generated model card (``README.md``: usage, model
summary, data, the experiment's RESULTS.md table, the resolved config) to that Hugging Face Hub repository
in one commit (created if needed; huggingface_hub's login / HF_TOKEN). Anyone can then load it with
``SpeechCLIPPlus.from_pretrained("hf://ORG/NAME")``, ``bin.score --model``, ``bin.extract --model`` or the
SUPERB entries. If the upload fails the exported file stays in place; re-run with the same options.
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
    parser.add_argument("--push_to_hub", default=None, metavar="ORG/NAME",
                        help="also upload the model file and a model card to this Hugging Face Hub repository")
    parser.add_argument("--hub_private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--hub_commit_message", default=None, help="commit message of the upload")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (export) %(levelname)s: %(message)s")
    if not args.push_to_hub:  # rebuilding the model must not wait on the network; a push needs it
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..model_file import ModelFileError, exp_config, export_model, load_exp_dir, resolve_checkpoint
    from ..hub import HubError, validate_repo_id

    try:
        if args.push_to_hub:
            validate_repo_id(args.push_to_hub)
        if args.dry_run:
            exp_config(args.exp_dir)
            log.info("dry run: would export %s -> %s%s", resolve_checkpoint(args.exp_dir, args.checkpoint), args.out,
                     f" and push it to {args.push_to_hub}" if args.push_to_hub else "")
            return 0
        model, cfg, meta = load_exp_dir(args.exp_dir, args.checkpoint)
        step = meta.get("step")
        meta = {"checkpoint": os.path.basename(meta["checkpoint"]), "step": None if step is None else int(step),
                "exp": os.path.basename(os.path.abspath(args.exp_dir))}
        export_model(model, cfg, args.out, meta=meta)
    except (ModelFileError, FileNotFoundError, HubError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_params = sum(p.numel() for p in model.parameters())
    log.info("exported %s (step %s, %s parameters, %.1f MB) -> %s", args.exp_dir, meta["step"], f"{n_params:,}",
             os.path.getsize(args.out) / 2**20, args.out)
    if args.push_to_hub:
        return push(args, cfg, meta)
    return 0


def push(args: argparse.Namespace, cfg: dict, meta: dict) -> int:
    """Upload ``args.out`` and its model card to ``args.push_to_hub`` (see the module docstring)."""
    from ..hub import HubError, model_card, push_model

    results = os.path.join(args.exp_dir, "RESULTS.md")
    results_md = open(results, encoding="utf-8").read() if os.path.isfile(results) else None
    card = model_card(args.push_to_hub, cfg, meta, results_md)
    try:
        url = push_model(args.out, args.push_to_hub, card, private=args.hub_private,
                         commit_message=args.hub_commit_message)
    except HubError as e:
        print(f"error: {e} (the exported {args.out} is intact; re-run to retry the upload)", file=sys.stderr)
        return 1
    log.info("pushed %s and its model card to %s (%s); load it with hf://%s", args.out, args.push_to_hub, url,
             args.push_to_hub)
    return 0


if __name__ == "__main__":
    sys.exit(main())

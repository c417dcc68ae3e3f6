"""Score an experiment on a test set: retrieval R@1/5/10 per branch, keyword metrics, plots (recipe stage 5).

    python -m speechclip_plus.bin.score (--exp_dir exp/<tag> | --model model.pt|hf://ORG/NAME[@REV]) \\
        --data_dir data/test --image_embeds dump/<clip tag>/test/img_embed.scp --out_dir exp/<tag>/test \\
        [--checkpoint best|last|<path>] [--batch_size 16] [--num_plots 4] [--untrained]

Writes <out_dir>/results.json, keywords.txt / keywords.jsonl (cascaded variants), plots/*.png, and a section
of <exp_dir>/RESULTS.md (replaced when the same set and checkpoint are scored again); with --model (a model
file, e.g. an imported official checkpoint, or a Hub model) that section goes to <out_dir>/RESULTS.md.
--untrained scores a freshly initialised model built from <exp_dir>/config.yaml (seeded with train.seed, as
training starts): the baseline a trained model should beat. Metric definitions: speechclip_plus/eval/scoring.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

log = logging.getLogger("speechclip_plus.score")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--exp_dir", help="experiment dir (config.yaml, checkpoints/)")
    source.add_argument("--model", help="model file (bin.export / bin.import_reference) or hf://ORG/NAME[@REV]")
    parser.add_argument("--data_dir", required=True, help="Kaldi data dir of the test set")
    parser.add_argument("--image_embeds", required=True, help="stage-2 img_embed.scp of the test set")
    parser.add_argument("--out_dir", required=True, help="output dir (e.g. exp/<tag>/test)")
    parser.add_argument("--checkpoint", default="best", help="best | last | path (default: best)")
    parser.add_argument("--untrained", action="store_true", help="score a freshly initialised model instead")
    parser.add_argument("--batch_size", type=int, default=16, help="utterances per forward pass")
    parser.add_argument("--num_plots", type=int, default=4, help="utterances to plot (0: no plots)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device")
    parser.add_argument("--batched_upstream", action="store_true",
                        help="run the upstream on padded batches even when it is not batch-invariant "
                             "(faster; HuBERT outputs then depend slightly on the batch; default: only when it is)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry_run", action="store_true", help="check the inputs, score nothing")
    return parser


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def main(argv: Optional[List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (score) %(levelname)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.batch_size < 1 or args.num_plots < 0:
        print("error: --batch_size must be >= 1 and --num_plots >= 0", file=sys.stderr)
        return 2
    from ..model_file import ModelFileError, build_untrained, exp_config, load_any, load_exp_dir, resolve_checkpoint
    from ..data.datadir import DataError
    from ..eval.scoring import score

    try:
        for path, what in ((args.data_dir, "--data_dir"), (args.image_embeds, "--image_embeds")):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{what} {path}: not found")
        if args.untrained and args.model:
            raise ValueError("--untrained needs --exp_dir (the config to build the untrained model from)")
        if args.dry_run:
            if args.model:
                if not args.model.startswith("hf://") and not os.path.isfile(args.model):
                    raise FileNotFoundError(f"--model {args.model}: not found")
            else:
                exp_config(args.exp_dir)
                if not args.untrained:
                    resolve_checkpoint(args.exp_dir, args.checkpoint)
            log.info("dry run: inputs look fine")
            return 0
        results_dir = args.exp_dir
        if args.model:
            model, cfg, meta = load_any(args.model)
            meta = {**meta, "model": args.model}
            label = os.path.basename(args.model) if not args.model.startswith("hf://") else args.model
            results_dir = args.out_dir
        elif args.untrained:
            cfg = exp_config(args.exp_dir)
            model = build_untrained(cfg)
            meta = {"checkpoint": None, "untrained": True, "seed": cfg["train"]["seed"]}
            label = f"untrained (seed {cfg['train']['seed']})"
        else:
            model, cfg, meta = load_exp_dir(args.exp_dir, args.checkpoint)
            meta = {"checkpoint": os.path.basename(meta["checkpoint"]),
                    "step": None if meta.get("step") is None else int(meta["step"])}
            label = f"{meta['checkpoint']}" + (f" (step {meta['step']})" if meta["step"] is not None else "")
        model.upstream.per_utterance = False if args.batched_upstream else "auto"
        model.to(args.device)
        results = score(model, args.data_dir, args.image_embeds, args.out_dir, exp_dir=results_dir, cfg=cfg,
                        label=label, meta=meta, batch_size=args.batch_size, num_plots=args.num_plots,
                        device=args.device, progress=not args.no_progress)
    except (ModelFileError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for branch, m in results["retrieval"].items():
        log.info("%s: S->I R@1/5/10 %.2f %.2f %.2f, I->S R@1/5/10 %.2f %.2f %.2f", branch,
                 *(100 * m[f"speech_to_image_r{k}"] for k in (1, 5, 10)),
                 *(100 * m[f"image_to_speech_r{k}"] for k in (1, 5, 10)))
    if results["keywords"]:
        kw = results["keywords"]
        log.info("keywords: subword hit %.2f%%, word hit %.2f%%, duplicates %.2f%%, mean K %.2f",
                 100 * kw["subword_hit_rate"], 100 * kw["word_hit_rate"], 100 * kw["duplicate_rate"],
                 kw["mean_keywords"])
    log.info("results in %s, table in %s", os.path.join(args.out_dir, "results.json"),
             os.path.join(results_dir, "RESULTS.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

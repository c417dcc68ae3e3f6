"""Convert an official SpeechCLIP / SpeechCLIP+ checkpoint into a model file of this toolkit.

    python -m speechclip_plus.bin.import_reference CKPT --out model.pt [--config REF_YAML] [--vocab BYFREQ.npy] \\
        [--frozen check|checkpoint] [--upstream NAME] [--upstream_ckpt PATH] [--clip NAME|JSON] \\
        [--clip_pretrained TAG|PATH] [--allow_global MODULE.NAME ...]

CKPT is the authors' PyTorch Lightning checkpoint (a local file, or hf://ORG/NAME[@REVISION]/path/to/file.ckpt
for the copies on the Hugging Face Hub). It is read without running any code it contains: only tensors,
plain containers and inert stand-ins for the reference's config namespace and logger are accepted; any
other pickled global is refused with its name. The reference hyper-parameters stored in the checkpoint (or
--config) are translated into our config, every reference tensor is mapped onto our model or listed as
ignored with the reason, and the frozen HuBERT / CLIP copies in the checkpoint are compared with the s3prl /
open_clip models the config names (--frozen check, the default) or used instead (--frozen checkpoint).
The output loads with SpeechCLIPPlus.from_pretrained, bin.score --model, bin.extract and the SUPERB entries.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

log = logging.getLogger("speechclip_plus.import_reference")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="official checkpoint (.ckpt) or hf://ORG/NAME[@REVISION]/path/file.ckpt")
    parser.add_argument("--out", required=True, help="output model file (e.g. exp/official_base_hplus/model.pt)")
    parser.add_argument("--config", default=None,
                        help="reference YAML of the run (default: the hyper-parameters stored in the checkpoint)")
    parser.add_argument("--vocab", default=None,
                        help="reference vocabulary (text_clip_vocab_usage_byfreq.npy); default: recovered from "
                             "the checkpoint's reduced token table")
    parser.add_argument("--frozen", default="check", choices=["check", "checkpoint"],
                        help="frozen HuBERT/CLIP: check the checkpoint's copies against s3prl/open_clip "
                             "(default) or use the checkpoint's copies")
    parser.add_argument("--upstream", default=None, help="s3prl upstream entry instead of the one the config names")
    parser.add_argument("--upstream_ckpt", default=None, help="checkpoint for an s3prl *_local upstream entry")
    parser.add_argument("--clip", default=None, help="open_clip architecture or model-config .json instead")
    parser.add_argument("--clip_pretrained", default=None, help="open_clip pretrained tag or state-dict file")
    parser.add_argument("--allow_global", action="append", default=[], metavar="MODULE.NAME",
                        help="also accept this pickled global as an inert record (repeatable; only for a file "
                             "you have inspected)")
    parser.add_argument("--print_config", action="store_true", help="print the translated config and exit")
    parser.add_argument("--dry_run", action="store_true",
                        help="read, translate and map the checkpoint (no model built, nothing written)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (import_reference) %(levelname)s: %(message)s")
    from ..config import dump_config
    from ..hub import download, is_hub_uri
    from ..reference.convert import Overrides, import_reference, prepare

    overrides = Overrides(args.upstream, args.upstream_ckpt, args.clip, args.clip_pretrained)
    try:
        ckpt = download(args.ckpt, default_filename=None) if is_hub_uri(args.ckpt) else args.ckpt
        if args.print_config or args.dry_run:
            p = prepare(ckpt, args.config, overrides, args.allow_global)
            if args.print_config:
                print(dump_config(p.cfg), end="")
                return 0
            ignored = sum(len(v) for v in p.mapped.ignored.values())
            log.info("dry run: %s is variant %s; %d tensors map onto the model, %d frozen tensors to check, %d "
                     "ignored; would write %s", args.ckpt, p.variant, len(p.mapped.sources),
                     len(p.mapped.upstream) + len(p.mapped.clip), ignored, args.out)
            return 0
        summary = import_reference(ckpt, args.out, args.config, args.vocab, args.frozen, overrides,
                                   args.allow_global)
    except (ValueError, OSError) as e:  # every import, Hub and model-file error names its file and key
        print(f"error: {e}", file=sys.stderr)
        return 1
    log.info("imported %s (%s, step %s) -> %s (%.1f MB)", args.ckpt, summary["variant"], summary["global_step"],
             args.out, os.path.getsize(args.out) / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())

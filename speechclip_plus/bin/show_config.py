"""Print a resolved config, one key of it, or the tag naming its CLIP image-embedding cache.

    python -m speechclip_plus.bin.show_config --config conf/x.yaml [--key model.clip.name] [--clip_tag] [overrides]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional

from ..config import ConfigError, dump_config, load_config


def clip_tag(cfg) -> str:
    """``clip_<arch>_<weights>``: names the image-embedding cache shared by experiments with the same CLIP."""
    clip = cfg["model"]["clip"]
    arch = os.path.splitext(os.path.basename(clip["name"]))[0]
    pre = clip["pretrained"]
    weights = "random" if pre is None else (os.path.splitext(os.path.basename(pre))[0] if os.sep in pre or "." in pre else pre)
    if pre is not None and os.sep in pre:
        weights = os.path.basename(os.path.dirname(os.path.abspath(pre))) + "-" + weights
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"clip_{arch}_{weights}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config")
    parser.add_argument("--key", help="print only this dotted key")
    parser.add_argument("--clip_tag", action="store_true", help="print the image-embedding cache tag")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.clip_tag:
        print(clip_tag(cfg))
    elif args.key:
        node = cfg
        for part in args.key.split("."):
            if not isinstance(node, dict) or part not in node:
                print(f"error: no key '{args.key}'", file=sys.stderr)
                return 2
            node = node[part]
        print(node if not isinstance(node, (dict, list)) else dump_config(node).strip())
    else:
        print(dump_config(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

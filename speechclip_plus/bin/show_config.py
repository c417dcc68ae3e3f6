"""Print a resolved config, one key of it, or the folder name of its CLIP image-embedding cache.

    python -m speechclip_plus.bin.show_config --config conf/x.yaml [--key model.clip.name] [--clip_tag] [overrides]
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..config import ConfigError, dump_config, load_config
from ..data.datadir import DataError


def clip_tag(cfg) -> str:
    """The image-embedding cache folder of the config's CLIP, keyed by its content (``data.cache_key``)."""
    from ..data.cache_key import clip_tag as tag

    clip = cfg["model"]["clip"]
    return tag(clip["name"], clip["pretrained"], clip["quick_gelu"])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config")
    parser.add_argument("--key", help="print only this dotted key")
    parser.add_argument("--clip_tag", action="store_true",
                        help="print the image-embedding cache folder name (keyed by the CLIP config and weights)")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.clip_tag:
        try:
            print(clip_tag(cfg))
        except DataError as e:
            print(f"error: {args.config}: {e}", file=sys.stderr)
            return 2
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

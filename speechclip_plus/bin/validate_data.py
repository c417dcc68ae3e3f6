"""Check Kaldi-style data dirs (stage 0): print every problem as ``file:line: key: what``.

    python -m speechclip_plus.bin.validate_data data/train [data/dev ...] [--no_check_files]

Exit status 0 when every dir is valid, 1 otherwise (at most --max_problems lines shown per dir).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from speechclip_plus.data.datadir import validate_data_dir


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dirs", nargs="+", metavar="data_dir")
    parser.add_argument("--no_check_files", "--no-check-files", dest="check_files", action="store_false",
                        help="do not check that the audio and image files exist")
    parser.add_argument("--max_problems", type=int, default=50, help="problems printed per dir (0 = all)")
    args = parser.parse_args(argv)
    status = 0
    for d in args.data_dirs:
        problems = validate_data_dir(d, check_files=args.check_files)
        if not problems:
            print(f"{d}: OK")
            continue
        status = 1
        shown = problems if args.max_problems <= 0 else problems[: args.max_problems]
        for p in shown:
            print(p, file=sys.stderr)
        hidden = len(problems) - len(shown)
        print(f"{d}: {len(problems)} problem(s)" + (f" ({hidden} not shown)" if hidden else ""), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

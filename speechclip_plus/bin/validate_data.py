"""Check Kaldi-style data dirs (stage 0): print every problem as ``file:line: key: what``.

    python -m speechclip_plus.bin.validate_data data/train [data/dev ...] [--no_check_files] [--check_images]
        [--fix_dir]

Exit status 0 when every dir is valid, 1 otherwise (the first --max_problems lines shown per dir, then the
count). --fix_dir repairs each invalid dir in place (``fix_data_dir``): files sorted, CRs and identical
duplicate lines removed, and the utterances with a skippable problem (missing audio or image file, image
that does not decode with --check_images, empty caption, image not in img.scp, missing from a file)
excluded; their reasons go to <dir>/excluded.txt and the original files to <dir>/.backup[.N]/. The dir is
then validated again. Audio and image files are never modified.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from speechclip_plus.data.datadir import MAX_SHOWN, DataError, fix_data_dir, validate_data_dir


def _report(d: str, problems: List[str], max_problems: int) -> None:
    shown = problems if max_problems <= 0 else problems[:max_problems]
    for p in shown:
        print(p, file=sys.stderr)
    hidden = len(problems) - len(shown)
    print(f"{d}: {len(problems)} problem(s)" + (f" ({hidden} not shown)" if hidden else ""), file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dirs", nargs="+", metavar="data_dir")
    parser.add_argument("--no_check_files", "--no-check-files", dest="check_files", action="store_false",
                        help="do not check that the audio and image files exist")
    parser.add_argument("--check_images", "--check-images", dest="check_images", action="store_true",
                        help="decode every image in full (finds corrupt images before stage 2; slow)")
    parser.add_argument("--fix_dir", "--fix-dir", dest="fix_dir", action="store_true",
                        help="repair invalid dirs in place, excluding utterances with skippable problems "
                             "(listed in <dir>/excluded.txt, originals in <dir>/.backup/)")
    parser.add_argument("--max_problems", type=int, default=MAX_SHOWN, help="problems printed per dir (0 = all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    status = 0
    for d in args.data_dirs:
        problems = validate_data_dir(d, check_files=args.check_files, check_images=args.check_images)
        if not problems:
            print(f"{d}: OK")
            continue
        _report(d, problems, args.max_problems)
        if args.fix_dir:
            try:
                stats = fix_data_dir(d, check_files=args.check_files, check_images=args.check_images)
            except DataError as e:
                print(f"error: {d}: cannot be fixed automatically: {e}", file=sys.stderr)
                status = 1
                continue
            problems = validate_data_dir(d, check_files=args.check_files, check_images=args.check_images)
            if not problems:
                print(f"{d}: fixed: {stats['kept']} utterance(s) kept, {stats['removed']} excluded")
                continue
            _report(d, problems, args.max_problems)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

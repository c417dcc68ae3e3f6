"""Kaldi-style data directories: the format, and the command line of the data-dir tools.

A data dir holds text files with one entry a line, ``<key> <value>``: the key is the first field (no
whitespace), the value the rest of the line (so paths may contain spaces). Files are sorted by key in
``LC_ALL=C`` byte order (for UTF-8 keys that is code-point order, what ``sorted`` gives for ``str``).

=============  ==========================================  =========
file           entry                                       required
=============  ==========================================  =========
``wav.scp``    utt -> absolute audio path                  yes
``text``       utt -> transcription                        yes
``utt2spk``    utt -> speaker id                           yes
``spk2utt``    speaker -> its utts (space separated)       yes
``utt2img``    utt -> image id                             yes
``img.scp``    image id -> absolute image path             yes
``utt2dur``    utt -> duration in seconds (stage 1)        no
=============  ==========================================  =========

Errors name ``file:line: key: what is wrong``. Lines ending in CR LF are accepted (the CR is removed and a
warning logged). ``python -m speechclip_plus.data.datadir {subset,combine,fix} ...`` is the command line of
the ``utils/*_data_dir.sh`` wrappers.

Tools that drop utterances from a data dir in place (``fix_data_dir``, ``format_audio(skip_bad=True)``,
``embed_images --skip_bad``) first copy its files to a fresh ``<dir>/.backup[.N]/`` (``backup_data_dir``) and
list every dropped utterance with its reason in ``<dir>/excluded.txt`` (``<item> <reason>``, merged over runs;
``add_excluded``, also the writer of stage 0's lists, ``data.corpus``).

The code is split by concern: ``data.tables`` (the file format, ``DataDir``, writing), ``data.validate``
(validation), ``data.repair`` (subset, combine, fix, exclusions); this module re-exports their public names, so
``from speechclip_plus.data.datadir import ...`` is the one import recipes need.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
from typing import List, Optional, Sequence

from speechclip_plus.data.repair import (add_excluded, backup_data_dir, combine_data_dirs, fix_data_dir, read_excluded,
                                         remove_utterances, subset_data_dir)
from speechclip_plus.data.tables import (EXCLUDED_FILE, MAX_SHOWN, OPTIONAL_FILES, REQUIRED_FILES, UTT_FILES, DataDir,
                                         DataError, Entry, format_duration, parse_entries, read_kv, sort_key,
                                         spk2utt_from_utt2spk, write_data_dir, write_kv)
from speechclip_plus.data.validate import check_data_dir, image_problem, validate_data_dir

__all__ = ["EXCLUDED_FILE", "MAX_SHOWN", "OPTIONAL_FILES", "REQUIRED_FILES", "UTT_FILES", "DataDir", "DataError",
           "Entry", "add_excluded", "backup_data_dir", "check_data_dir", "combine_data_dirs", "fix_data_dir",
           "format_duration", "image_problem", "parse_entries", "read_excluded", "read_kv", "remove_utterances",
           "sort_key", "spk2utt_from_utt2spk", "subset_data_dir", "validate_data_dir", "write_data_dir", "write_kv"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- command line
def _read_list(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def _select(d: DataDir, args: argparse.Namespace) -> List[str]:
    utts = d.utts
    if args.utt_list:
        return _read_list(args.utt_list)
    if args.spk_list:
        speakers = set(_read_list(args.spk_list))
        return [u for u in utts if d.utt2spk[u] in speakers]
    if args.first is not None:
        return utts[: args.first]
    if args.last is not None:
        return utts[len(utts) - args.last :] if args.last else []
    if args.random is not None:
        return random.Random(args.seed).sample(utts, min(args.random, len(utts)))
    durs = d.utt2dur
    if durs is None:
        raise DataError(f"{d.path}: --shortest needs utt2dur (run stage 1 / format_audio first)")
    return sorted(utts, key=lambda u: (durs[u], sort_key(u)))[: args.shortest]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m speechclip_plus.data.datadir", description="Data-dir surgery (see utils/*.sh)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("subset", help="copy a subset of the utterances of a data dir")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--utt-list", "--utt_list", dest="utt_list", help="file whose first field is an utt id")
    how.add_argument("--spk-list", "--spk_list", dest="spk_list", help="file whose first field is a speaker id")
    how.add_argument("--first", type=int, help="the first N utterances (LC_ALL=C order)")
    how.add_argument("--last", type=int, help="the last N utterances")
    how.add_argument("--random", type=int, help="N utterances drawn at random (see --seed)")
    how.add_argument("--shortest", type=int, help="the N shortest utterances (needs utt2dur)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random")
    p.add_argument("src")
    p.add_argument("dest")
    p = sub.add_parser("combine", help="union of data dirs")
    p.add_argument("dest")
    p.add_argument("srcs", nargs="+")
    p = sub.add_parser("fix", help="sort, drop inconsistent utterances, rebuild spk2utt (backup in .backup/, "
                                   "dropped utterances in excluded.txt)")
    p.add_argument("--check-files", "--check_files", dest="check_files", action="store_true",
                   help="also drop utterances whose audio or image file is missing")
    p.add_argument("--check-images", "--check_images", dest="check_images", action="store_true",
                   help="also drop utterances whose image does not decode (slow)")
    p.add_argument("dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    for n in ("first", "last", "random", "shortest"):
        if getattr(args, n, None) is not None and getattr(args, n) < 0:
            parser.error(f"--{n} must be >= 0")
    try:
        if args.command == "subset":
            n = subset_data_dir(args.src, args.dest, _select(DataDir(args.src), args))
            log.info("subset: %d utterance(s) of %s -> %s", n, args.src, args.dest)
        elif args.command == "combine":
            n = combine_data_dirs(args.dest, args.srcs)
            log.info("combine: %d utterance(s) from %d dir(s) -> %s", n, len(args.srcs), args.dest)
        else:
            fix_data_dir(args.dir, check_files=args.check_files, check_images=args.check_images)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage 1: check every audio file of a data dir, convert the non-16 kHz / non-mono ones, write utt2dur.

    python -m speechclip_plus.bin.format_audio --data_dir data/train --dump_dir dump/audio/train [--nj 2]

Converted files (16-bit PCM WAV) go to --dump_dir and wav.scp is rewritten to point at them (the previous
wav.scp is kept as wav.scp.orig); source audio files are never modified. A missing, unreadable, empty,
non-finite or silent file stops the stage (exit 1) with the first ten listed and their count; with
--skip_bad their utterances are removed from the data dir instead (reasons in <data_dir>/excluded.txt, the
original data-dir files in <data_dir>/.backup[.N]/).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from speechclip_plus.data.audio import format_audio
from speechclip_plus.data.datadir import DataError


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="Kaldi-style data dir (wav.scp is read and rewritten)")
    parser.add_argument("--dump_dir", required=True, help="directory for converted audio files")
    parser.add_argument("--sample_rate", type=int, default=16000, help="target sample rate (Hz)")
    parser.add_argument("--nj", type=int, default=1, help="parallel processes")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--skip_bad", action="store_true",
                        help="exclude the utterances with bad audio (listed in <data_dir>/excluded.txt) "
                             "instead of failing")
    args = parser.parse_args(argv)
    if args.sample_rate <= 0 or args.nj <= 0:
        parser.error("--sample_rate and --nj must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        stats = format_audio(args.data_dir, args.dump_dir, args.sample_rate, nj=args.nj,
                             progress=not args.no_progress, skip_bad=args.skip_bad)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logging.info("%s: %d utterance(s), %d converted", args.data_dir, stats["utts"], stats["converted"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage 3: vocabularies from training transcriptions.

    python -m speechclip_plus.bin.make_vocab --text data/train/text [--text ...] --out_dir data/token_list \
        [--spm_vocab_size 500 --spm_model_type bpe]

Writes <out_dir>/clip_vocab_usage.txt (``<CLIP token id> <count>`` by frequency: the keyword codebook) and,
when --spm_vocab_size > 0, <out_dir>/spm/bpe.model (+ bpe.vocab).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from speechclip_plus.data.datadir import DataError, read_kv
from speechclip_plus.data.vocab import clip_vocab_usage, train_spm, write_vocab_usage


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", action="append", required=True, help="Kaldi text file (repeatable)")
    parser.add_argument("--out_dir", required=True, help="output directory (data/token_list)")
    parser.add_argument("--spm_vocab_size", type=int, default=0, help="sentencepiece vocabulary size (0 = skip)")
    parser.add_argument("--spm_model_type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    args = parser.parse_args(argv)
    if args.spm_vocab_size < 0:
        parser.error("--spm_vocab_size must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        texts: List[str] = []
        names: List[str] = []
        for path in args.text:
            for utt, caption in read_kv(path).items():
                texts.append(caption)
                names.append(f"{path}: {utt}")
        ids, counts = clip_vocab_usage(texts, names)
        usage = os.path.join(args.out_dir, "clip_vocab_usage.txt")
        write_vocab_usage(usage, ids, counts)
        logging.info("%s: %d CLIP token(s) used by %d caption(s)", usage, len(ids), len(texts))
        if args.spm_vocab_size:
            model = train_spm(texts, os.path.join(args.out_dir, "spm", args.spm_model_type), args.spm_vocab_size,
                              model_type=args.spm_model_type)
            logging.info("%s: sentencepiece %s, %d pieces", model, args.spm_model_type, args.spm_vocab_size)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

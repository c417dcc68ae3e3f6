"""Stage 3: vocabularies from training transcriptions.

    python -m speechclip_plus.bin.make_vocab --text data/train/text [--text ...] --out_dir data/token_list \
        [--spm_vocab_size 500 --spm_model_type bpe]

Writes <out_dir>/clip_vocab_usage.txt (``<CLIP token id> <count>`` by frequency: the keyword codebook) and,
when --spm_vocab_size > 0, <out_dir>/spm/bpe.model (+ bpe.vocab). A --spm_vocab_size larger than the captions
allow (small corpora) is capped at what they allow, with a warning naming the size used; --spm_exact makes
it an error instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from speechclip_plus.data.datadir import DataError, read_kv
from speechclip_plus.data.vocab import clip_vocab_usage, train_spm, write_vocab_usage


def _piece_count(model: str) -> int:
    import sentencepiece

    return int(sentencepiece.SentencePieceProcessor(model_file=model).get_piece_size())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", action="append", required=True, help="Kaldi text file (repeatable)")
    parser.add_argument("--out_dir", required=True, help="output directory (data/token_list)")
    parser.add_argument("--spm_vocab_size", type=int, default=0, help="sentencepiece vocabulary size (0 = skip)")
    parser.add_argument("--spm_model_type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    parser.add_argument("--spm_exact", action="store_true",
                        help="a --spm_vocab_size the captions cannot fill is an error (default: capped, warned)")
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
                              model_type=args.spm_model_type, hard_limit=args.spm_exact)
            pieces = _piece_count(model)
            if pieces < args.spm_vocab_size:
                logging.warning("sentencepiece: --spm_vocab_size %d is more than these %d caption(s) allow: "
                                "capped at %d pieces (pass --spm_vocab_size %d to make it explicit)",
                                args.spm_vocab_size, len(texts), pieces, pieces)
            logging.info("%s: sentencepiece %s, %d pieces", model, args.spm_model_type, pieces)
    except DataError as e:
        hint = " (use a smaller --spm_vocab_size, or drop --spm_exact to cap it)" if "sentencepiece" in str(e) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Extract speech embeddings of a data dir to a kaldiio ark/scp pair.

    python -m speechclip_plus.bin.extract (--model model.pt|hf://ORG/NAME[@REV] | --exp_dir exp/<tag> \\
        [--checkpoint best]) \\
        --data_dir data/test --out_dir <dir> [--branch parallel|cascaded|combined|hidden] [--layer -1]

Utterance branches (parallel, cascaded, combined = normalize(parallel + cascaded); default: the model's
retrieval branch) write one unit-norm float32 vector (E,) per utterance. ``hidden`` writes a float32 matrix
(T, D) per utterance: hidden state ``--layer`` of the list SUPERB sees (upstream states, then the attention
block's frame outputs; -1 = the last), frames past the utterance's length removed.
Output: <out_dir>/embed.ark and embed.scp (``<utt> <absolute ark path>:<offset>``, sorted by utterance), written
under temporary names and renamed when complete (``data.kaldi_ark.write_ark_scp``, the image cache's writer too).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Iterator, List, Optional, Tuple

import numpy as np

log = logging.getLogger("speechclip_plus.extract")
NAME = "embed"  # <out_dir>/embed.{ark,scp}


def extract(model, data_dir: str, branch: str, layer: int = -1, batch_size: int = 16, device: str = "cpu",
            progress: bool = True) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield ``(utt, array)`` for every utterance of ``data_dir`` (length-sorted batches)."""
    import torch

    from ..api import branch_embedding, eval_forward
    from ..data.dataset import SpeechImageDataset
    from ..eval.scoring import iterate_data_dir

    ds = SpeechImageDataset(data_dir)
    for batch in iterate_data_dir(ds, batch_size, progress, desc=f"extract {branch}"):
        wav, lens = batch["wav"].to(device), batch["wav_len"].to(device)
        if branch == "hidden":
            with torch.no_grad():
                states, feat_lens = model.hidden_states(wav, lens)
            if not -len(states) <= layer < len(states):
                raise ValueError(f"--layer {layer}: the model has {len(states)} hidden states")
            h = states[layer].float().cpu()
            for row, utt in enumerate(batch["utt"]):
                yield utt, h[row, : int(feat_lens[row])].numpy()
        else:
            emb = branch_embedding(eval_forward(model, wav, lens, texts=list(batch["text"])), branch).cpu()
            for row, utt in enumerate(batch["utt"]):
                yield utt, emb[row].numpy()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model file (bin.export / bin.import_reference) or hf://ORG/NAME[@REVISION]")
    src.add_argument("--exp_dir", help="experiment dir (uses --checkpoint)")
    parser.add_argument("--checkpoint", default="best", help="with --exp_dir: best | last | path")
    parser.add_argument("--data_dir", required=True, help="Kaldi data dir")
    parser.add_argument("--out_dir", required=True, help="output dir for embed.ark / embed.scp")
    parser.add_argument("--branch", default=None, choices=["parallel", "cascaded", "combined", "hidden"],
                        help="default: the model's retrieval branch")
    parser.add_argument("--layer", type=int, default=-1, help="hidden state index for --branch hidden")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--batched_upstream", action="store_true",
                        help="run the upstream on padded batches even when it is not batch-invariant "
                             "(faster; default: only when it is)")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (extract) %(levelname)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..model_file import ModelFileError, load_any, load_exp_dir
    from ..data.datadir import DataError
    from ..data.kaldi_ark import write_ark_scp

    try:
        model, _, _ = load_any(args.model) if args.model else load_exp_dir(args.exp_dir, args.checkpoint)
        branch = args.branch or model.retrieval_branch
        available = list(model.branches) + (["combined"] if len(model.branches) == 2 else []) + ["hidden"]
        if branch not in available:
            raise ValueError(f"--branch {branch}: variant '{model.variant}' offers {', '.join(available)}")
        model.upstream.per_utterance = False if args.batched_upstream else "auto"
        model.to(args.device)
        scp, n = write_ark_scp(args.out_dir, NAME, extract(model, args.data_dir, branch, args.layer, args.batch_size,
                                                     args.device, not args.no_progress))
    except (ModelFileError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log.info("%d %s embedding(s) -> %s", n, branch, scp)
    return 0


if __name__ == "__main__":
    sys.exit(main())

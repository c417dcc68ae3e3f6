#!/usr/bin/env python3
"""Train the mini recipe's teacher: open_clip's own ``CLIP`` at the tiny size of ``conf/clip_mini.json``.

Data: ``<data_dir>/<train_set>/{text,utt2img,img.scp}``; every step takes ``batch_size`` distinct images
(an epoch is a shuffled pass over the images) with one of each image's captions drawn at random, and
minimises open_clip's symmetric InfoNCE ``ClipLoss``:
    L = (CE(s * I T^T, diag) + CE(s * T I^T, diag)) / 2,  I, T L2-normalised, s = exp(logit_scale).
Images go through open_clip's eval transform once (the transform stage 2 uses later), then are augmented
as tensors by a random shift of up to ``--shift`` pixels (edge-replicated padding). The text tower runs on
the tokens up to the longest caption of the batch (``encode_text_trimmed``): with the causal mask and
EOT pooling this equals ``CLIP.encode_text`` on the 77-token input, at a fraction of the cost.

``conf/clip_mini.json`` uses open_clip's ModifiedResNet image tower (layers [1,1,1,1], width 16): on the
64-px scenes it reached test text->image R@1 0.88 in 300 steps, where a ViT of the same step cost
(patch 16, width 192, 4 layers) reached 0.56. bf16 autocast made a step ~20% cheaper at equal recall on a CPU
with native bf16, and many times slower on one without (``--precision auto`` picks it only where native).

Outputs in ``exp_dir`` (each written atomically through ``speechclip_plus.io``):
  clip.pt        the model's ``state_dict()`` (floating tensors in float32)
  <stem>.json    a copy of the model config; register it with ``open_clip.add_model_config`` and load with
                 ``open_clip.create_model_and_transforms(<stem>, pretrained=<exp_dir>/clip.pt)``
  metrics.json   text->image and image->text R@1/5/10 on ``--eval_sets`` (an image query hits when any of
                 its captions is in the top k; ties count against the query, as in stage 5's scoring),
                 computed with the checkpoint reloaded through open_clip
  train.log, .done
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning. Measured with 2 threads on 2 cores: when other jobs share the
# cores, spinning made a step 2.6x slower (1.34 s vs 0.51 s); on a quiet machine passive costs ~25%
# (0.32 s vs 0.25 s). Export OMP_WAIT_POLICY=ACTIVE to choose the other trade-off.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from speechclip_plus.data.datadir import read_kv  # noqa: E402
from speechclip_plus.eval.retrieval import chance_recall, recall_at_k  # noqa: E402
from speechclip_plus.io import atomic_write_text, torch_save_atomic  # noqa: E402
from speechclip_plus.train.precision import cpu_has_native_bf16  # noqa: E402

LOG = logging.getLogger("train_clip")


# ------------------------------------------------------------------------------------------------- data
def load_split(data_dir: Path) -> Tuple[List[str], List[str], List[List[str]]]:
    """(image ids, image paths, captions per image) of a Kaldi data dir, images in img.scp order."""
    img_scp = read_kv(data_dir / "img.scp")  # the toolkit's reader: errors name file:line: key
    text = read_kv(data_dir / "text")
    utt2img = read_kv(data_dir / "utt2img")
    captions: Dict[str, List[str]] = {k: [] for k in img_scp}
    for utt in sorted(text):
        img = utt2img.get(utt)
        if img is None:
            raise KeyError(f"{data_dir / 'text'}: utterance {utt} has no entry in {data_dir / 'utt2img'}")
        if img not in captions:
            raise KeyError(f"{data_dir / 'utt2img'}: {utt} -> {img}, not in {data_dir / 'img.scp'}")
        captions[img].append(text[utt])
    ids = [k for k in img_scp if captions[k]]
    if not ids:
        raise ValueError(f"{data_dir}: no image has a caption")
    return ids, [img_scp[k] for k in ids], [captions[k] for k in ids]


def load_images(paths: Sequence[str], preprocess) -> torch.Tensor:
    """Stack of ``preprocess(PIL image)`` tensors, (N, 3, H, W)."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(preprocess(im))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ model
@contextlib.contextmanager
def _quiet_root_logger(level: int = logging.ERROR):
    root = logging.getLogger()
    old = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(old)


def register_config(config: Path) -> str:
    """Register an open_clip model json; returns the model name (the file stem)."""
    cfg = json.loads(Path(config).read_text(encoding="utf-8"))
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise KeyError(f"{config}: open_clip model config needs key {key!r}")
    open_clip.add_model_config(Path(config))
    return Path(config).stem


def encode_text_trimmed(model: open_clip.CLIP, text: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(text)`` on ``text[:, :L]``, L = last non-pad column (argmax/EOT pooling only)."""
    if model.text_pool_type != "argmax":
        return model.encode_text(text)
    length = int((text != 0).sum(dim=1).max())
    text = text[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


def shift_images(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, edges replicated."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(off.tolist())])


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """Weight decay on matrices only (not on gains, biases, embeddings of positions or logit_scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, t)))


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed(model: open_clip.CLIP, images: torch.Tensor, tokens: torch.Tensor, chunk: int = 512):
    """L2-normalised image and text embeddings, computed in chunks."""
    model.eval()
    img = torch.cat([model.encode_image(images[i:i + chunk], normalize=True)
                     for i in range(0, len(images), chunk)])
    txt = torch.cat([F.normalize(encode_text_trimmed(model, tokens[i:i + chunk]), dim=-1)
                     for i in range(0, len(tokens), chunk)])
    return img.float(), txt.float()


def retrieval_recall(img: torch.Tensor, txt: torch.Tensor, txt2img: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """R@k both ways with the toolkit's retrieval code (``speechclip_plus.eval.retrieval.recall_at_k``, ties
    counted against the query), so the teacher's recall and the speech models' compare like with like.
    text->image: the caption's image in the top k; image->text: any of its captions in the top k."""
    recall = recall_at_k(txt, img, txt2img, ks, names=("t2i", "i2t"))
    out: Dict[str, float] = {}
    for k in ks:
        out[f"t2i_R@{k}"] = round(recall[f"t2i_r{k}"], 4)
        out[f"i2t_R@{k}"] = round(recall[f"i2t_r{k}"], 4)
    out["chance_t2i_R@5"] = round(chance_recall(txt2img, (5,), names=("t2i", "i2t"))["t2i_r5"], 4)
    out["num_images"], out["num_captions"] = img.shape[0], txt.shape[0]
    return out


def evaluate(model, preprocess, tokenizer, data_dir: Path) -> Dict[str, float]:
    ids, paths, caps = load_split(data_dir)
    images = load_images(paths, preprocess)
    flat = [c for cs in caps for c in cs]
    txt2img = torch.tensor([i for i, cs in enumerate(caps) for _ in cs])
    img, txt = embed(model, images, tokenizer(flat))
    return retrieval_recall(img, txt, txt2img)


# ------------------------------------------------------------------------------------------------ train
def train(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    exp_dir = Path(args.exp_dir)
    data_dir = Path(args.data_dir)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    name = register_config(Path(args.config))
    with _quiet_root_logger():  # open_clip warns that a model without pretrained weights is random: intended
        model, _, preprocess = open_clip.create_model_and_transforms(name)
    if not isinstance(model, open_clip.CLIP):
        raise TypeError(f"{args.config}: builds {type(model).__name__}, expected open_clip.CLIP")
    tokenizer = open_clip.get_tokenizer(name)

    t0 = time.time()
    ids, paths, caps = load_split(data_dir / args.train_set)
    images = load_images(paths, preprocess)
    flat = [c for cs in caps for c in cs]
    tokens = tokenizer(flat)
    first = torch.tensor([0] + [len(cs) for cs in caps]).cumsum(0)  # image i: captions first[i]:first[i+1]
    LOG.info("train: %d images, %d captions, images %s, loaded in %.1f s", len(ids), len(flat),
             tuple(images.shape[1:]), time.time() - t0)
    batch = min(args.batch_size, len(ids))
    steps_per_epoch = max(1, len(ids) // batch)
    total = args.epochs * steps_per_epoch if args.epochs > 0 else args.steps
    if total < 1:
        raise ValueError(f"--steps must be >= 1, got {total}")
    if args.precision == "auto":
        args.precision = "bf16" if cpu_has_native_bf16() else "fp32"
    bf16 = args.precision == "bf16"
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("model %s: %.2f M parameters; %d steps of %d images (%d per epoch), lr %g, %s", name,
             n_params / 1e6, total, batch, steps_per_epoch, args.lr, args.precision)

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    step, t0 = 0, time.time()
    order = torch.randperm(len(ids), generator=gen)
    pos = 0
    from tqdm import tqdm

    bar = tqdm(total=total, desc="clip_mini", unit="step", disable=args.no_progress)
    while step < total:
        if pos + batch > len(ids):
            order, pos = torch.randperm(len(ids), generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        n_caps = first[idx + 1] - first[idx]
        pick = first[idx] + (torch.rand(len(idx), generator=gen) * n_caps).long()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.warmup, args.lr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            img_f = model.encode_image(shift_images(images[idx], args.shift, gen), normalize=True)
            txt_f = F.normalize(encode_text_trimmed(model, tokens[pick]), dim=-1)
            loss = loss_fn(img_f.float(), txt_f.float(), model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == total:
            LOG.info("step %d/%d loss %.4f scale %.1f lr %.2e %.1f s", step, total, loss.item(),
                     model.logit_scale.exp().item(), opt.param_groups[0]["lr"], time.time() - t0)
    bar.close()
    train_seconds = time.time() - t0

    exp_dir.mkdir(parents=True, exist_ok=True)
    ckpt = exp_dir / "clip.pt"
    torch_save_atomic({k: v.detach().float() if v.is_floating_point() else v.detach()
                 for k, v in model.state_dict().items()}, ckpt)
    cfg_copy = exp_dir / Path(args.config).name
    atomic_write_text(cfg_copy, Path(args.config).read_text(encoding="utf-8"))

    # Reload through open_clip's own loader: what stage 2 and the CLIP wrapper will do.
    reloaded, _, preprocess_val = open_clip.create_model_and_transforms(register_config(cfg_copy),
                                                                         pretrained=str(ckpt))
    ref = model.state_dict()
    for key, value in reloaded.state_dict().items():
        if value.dtype != ref[key].dtype or not torch.equal(value, ref[key]):
            raise RuntimeError(f"{ckpt}: {key} differs after reloading through open_clip")
    metrics: Dict[str, Dict[str, float]] = {}
    for split in args.eval_sets:
        metrics[split] = evaluate(reloaded, preprocess_val, tokenizer, data_dir / split)
        LOG.info("%s: %s", split, " ".join(f"{k} {v:.3f}" for k, v in metrics[split].items() if "R@" in k))
    metrics["train"] = {"steps": total, "batch_size": batch, "seconds": round(train_seconds, 1),
                        "final_loss": round(loss.item(), 4), "parameters": n_params}
    atomic_write_text(exp_dir / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    return metrics


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="conf/clip_mini.json", help="open_clip model config (json)")
    p.add_argument("--data_dir", default="data", help="parent of the Kaldi data dirs")
    p.add_argument("--train_set", default="train")
    p.add_argument("--eval_sets", nargs="+", default=["dev", "test"])
    p.add_argument("--exp_dir", default="exp/clip_mini")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps")
    p.add_argument("--epochs", type=int, default=0,
                   help="if > 0, train this many passes over the training images instead of --steps")
    p.add_argument("--batch_size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--shift", type=int, default=3, help="max random shift of training images, pixels")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16: autocast on CPU (weights stay float32); auto: bf16 when the CPU has native bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--force", action="store_true", help="train even if <exp_dir>/.done exists")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    exp_dir = Path(args.exp_dir)
    done = exp_dir / ".done"
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s"
    LOG.setLevel(logging.INFO)  # open_clip logs its INFO lines to the root logger: keep those out
    if done.exists() and not args.force:
        logging.basicConfig(level=logging.WARNING, format=fmt)
        LOG.info("%s exists: teacher already trained, skipping (--force to retrain)", done)
        return 0
    exp_dir.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    logging.basicConfig(level=logging.WARNING, format=fmt,
                        handlers=[logging.StreamHandler(),
                                  logging.FileHandler(exp_dir / "train.log", mode="w")])
    LOG.info("command: %s", " ".join([sys.executable, *sys.argv]))
    train(args)
    done.touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())

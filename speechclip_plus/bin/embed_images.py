"""Stage 2: frozen CLIP image embeddings of the images of one or more data dirs, computed once.

    python -m speechclip_plus.bin.embed_images --data_dir data/train [--data_dir ...] --out_dir DIR \
        [--config conf/x.yaml [--model.clip.name ...]] [--clip_name ViT-B-32 --clip_pretrained openai] \
        [--skip_bad [--nj N]]

Embeds the union of the data dirs' img.scp (an image id shared by two dirs must have the same path) into
<out_dir>/img_embed.{ark,scp} (kaldiio, float32, L2-normalised). The CLIP model is --clip_name /
--clip_pretrained, else model.clip.{name,pretrained} of the config (with dotted overrides), else the config
defaults. --clip_pretrained none = random weights (tests only).

The cache is keyed by what it holds (``data.cache_key``): <out_dir>/cache_key.json records the CLIP key
(architecture or model-config content, weights tag or sha256 of the weights file, quick_gelu, open_clip
version) and the image list (ids, paths, sizes, mtimes). A later run with the same key reuses the cache and
says so; any difference (other weights under the same file name included) recomputes it. --overwrite
recomputes anyway.

A missing or undecodable image stops the stage (exit 1, nothing written) with the first ten listed and their
count. With --skip_bad every image is first checked (``data.corpus.check_images``, in --nj processes) and the
utterances of the bad ones are removed from their data dirs instead: the data-dir files are backed up in
<data_dir>/.backup[.N]/ and each utterance is listed with its reason in <data_dir>/excluded.txt (as stage 1
does for bad audio).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

from speechclip_plus.config import ConfigError, load_config
from speechclip_plus.data.cache_key import clip_key, image_list_key
from speechclip_plus.data.datadir import MAX_SHOWN, DataDir, DataError, parse_entries, read_kv, remove_utterances
from speechclip_plus.io import atomic_write_text

SCP_NAME = "img_embed.scp"  # as data.image_cache.SCP_NAME (not imported here: that module loads torch)
KEY_NAME = "cache_key.json"


def _up_to_date(scp: str, ids) -> bool:
    """The scp lists exactly ``ids`` and the ark files it points into exist."""
    if not os.path.isfile(scp):
        return False
    try:
        entries = read_kv(scp)
    except DataError:
        return False
    arks = {v.rsplit(":", 1)[0] for v in entries.values()}
    return set(entries) == set(ids) and all(os.path.isfile(a) for a in arks)


def _saved_key(out_dir: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(out_dir, KEY_NAME), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _describe_weights(key: Dict[str, Any]) -> str:
    w = key["clip"]["weights"]
    return f"{w[:7 + 16]}..." if w.startswith("sha256:") else w


def gather_images(data_dirs: List[str]) -> Dict[str, str]:
    """Union of the dirs' ``img.scp``; ``DataError`` if one id has two paths."""
    images: Dict[str, str] = {}
    origin: Dict[str, str] = {}
    for d in data_dirs:
        for image_id, path in DataDir(d).img.items():
            if image_id in images and images[image_id] != path:
                raise DataError(f"image {image_id} is {images[image_id]} in {origin[image_id]}/img.scp "
                                f"but {path} in {d}/img.scp")
            images[image_id] = path
            origin.setdefault(image_id, d)
    return images


def image_labels(data_dirs: List[str]) -> Dict[str, str]:
    """``{image id: "<dir>/img.scp:<line>"}`` (first occurrence), to name bad images in errors."""
    labels: Dict[str, str] = {}
    for d in data_dirs:
        scp = DataDir(d).file("img.scp")
        for lineno, image_id, _ in parse_entries(scp)[0]:
            labels.setdefault(image_id, f"{scp}:{lineno}")
    return labels


def exclude_bad_images(data_dirs: List[str], nj: int = 1) -> int:
    """``--skip_bad``: check every image of the dirs; remove the utterances of the bad ones from their dirs
    (backup + ``excluded.txt``, ``datadir.remove_utterances``). Returns the number of bad images."""
    from speechclip_plus.data.corpus import check_images

    bad = check_images(gather_images(data_dirs), nj)
    if not bad:
        return 0
    labels = image_labels(data_dirs)
    for d in data_dirs:
        dd = DataDir(d)
        reasons = {u: f"{labels[i]}: {i}: {bad[i]}" for u, i in dd.utt2img.items() if i in bad}
        if reasons:
            done = remove_utterances(d, reasons)
            for reason in sorted(set(reasons.values()))[:MAX_SHOWN]:
                logging.warning("excluded: %s", reason)
            logging.warning("%s: %d utterance(s) of %d bad image(s) excluded (listed in %s; original files in %s)",
                            d, len(reasons), len(set(reasons.values())), done["excluded"], done["backup"])
    return len(bad)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", action="append", required=True, help="data dir with img.scp (repeatable)")
    parser.add_argument("--out_dir", required=True, help="output directory of img_embed.{ark,scp}")
    parser.add_argument("--config", help="training YAML naming the CLIP model (model.clip.*)")
    parser.add_argument("--clip_name", help="open_clip architecture or model-config .json (overrides the config)")
    parser.add_argument("--clip_pretrained", help="open_clip tag, checkpoint file or 'none' (overrides the config)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0")
    parser.add_argument("--overwrite", action="store_true", help="recompute even if the cache is complete")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--skip_bad", action="store_true",
                        help="exclude the utterances of missing or undecodable images (listed in "
                             "<data_dir>/excluded.txt) instead of failing")
    parser.add_argument("--nj", type=int, default=1, help="processes for the image check of --skip_bad")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("--") and not o.lstrip("-").split("=")[0].count(".")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are dotted: --model.clip.name)")
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        clip_cfg = load_config(args.config, overrides)["model"]["clip"]
        name = args.clip_name or clip_cfg["name"]
        pretrained = clip_cfg["pretrained"] if args.clip_pretrained is None else args.clip_pretrained
        if pretrained is not None and pretrained.lower() in ("none", "null", ""):
            pretrained = None
        images = gather_images(args.data_dir)
        key = {"clip": clip_key(name, pretrained, clip_cfg["quick_gelu"]), "images": image_list_key(images)}
        scp = os.path.join(args.out_dir, SCP_NAME)
        saved = _saved_key(args.out_dir)
        if not args.overwrite and saved == key and _up_to_date(scp, images):
            logging.info("reusing %s (same CLIP weights %s, same %d images)", args.out_dir, _describe_weights(key),
                         len(images))
            return 0
        if args.skip_bad and exclude_bad_images(args.data_dir, args.nj):
            images = gather_images(args.data_dir)
            key["images"] = image_list_key(images)
        if saved is not None and saved != key:
            changed = [part for part in ("clip", "images") if saved.get(part) != key[part]]
            logging.info("recomputing %s: its %s changed", args.out_dir,
                         " and ".join({"clip": "CLIP", "images": "image list"}[p] for p in changed))
        import torch

        from speechclip_plus.data.image_cache import compute_image_embeddings
        from speechclip_plus.models.clip import FrozenCLIP

        clip = FrozenCLIP(name, pretrained, quick_gelu=clip_cfg["quick_gelu"]).to(torch.device(args.device))
        logging.info("CLIP %s (weights: %s) on %d image(s) of %s", name, pretrained or "random", len(images),
                     " ".join(args.data_dir))
        key_path = os.path.join(args.out_dir, KEY_NAME)
        if os.path.exists(key_path):  # the key goes first, so a key never describes other embeddings
            os.remove(key_path)
        compute_image_embeddings(images, lambda x: clip.encode_image(x).float().cpu(), clip.preprocess,
                                 args.out_dir, batch_size=args.batch_size, progress=not args.no_progress,
                                 labels=image_labels(args.data_dir))
        atomic_write_text(key_path, json.dumps(key, indent=1, sort_keys=True) + "\n")
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

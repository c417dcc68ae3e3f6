"""Speech-image pairs of a data dir, and their collation into padded batches.

One item per utterance (``LC_ALL=C`` order of ``wav.scp``). ``image_index`` is the position of the
utterance's image id in the sorted ``img.scp`` keys, so it is the same in every process and worker (the
contrastive loss masks pairs with equal index). Waveforms are returned whole: the training-time random
crop belongs to the model.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from speechclip_plus.data.audio import audio_duration, load_audio
from speechclip_plus.data.datadir import DataDir, DataError, sort_key

EmbedSource = Union[str, os.PathLike, Mapping[str, Any], None]


class SpeechImageDataset(Dataset):
    """Items ``dict(utt, wav (L,) float32, image_id, image_index, image_embed (D,) | None, text)``.

    image_embeds: path to an ``img_embed.scp`` (``kaldi_ark.EmbeddingScp``, read lazily per item) or a
        mapping image id -> vector; every image used by the data dir must be present. None: no embedding.
    image_loader: ``callable(path) -> tensor`` giving an item's ``image``; only when ``image_embeds`` is None
        (training uses the cache; this is for tools that need pixels).
    """

    def __init__(
        self,
        data_dir: Union[str, os.PathLike],
        image_embeds: EmbedSource = None,
        sample_rate: int = 16000,
        image_loader: Optional[Callable[[str], torch.Tensor]] = None,
    ):
        if image_embeds is not None and image_loader is not None:
            raise ValueError("SpeechImageDataset: give image_embeds or image_loader, not both")
        self.data_dir = DataDir(data_dir)
        self.sample_rate = int(sample_rate)
        self.image_loader = image_loader
        d = self.data_dir
        self.utts: List[str] = d.utts
        self.wav, self.text, self.utt2img, self.img = d.wav, d.text, d.utt2img, d.img
        for name, table in (("text", self.text), ("utt2img", self.utt2img)):
            missing = [u for u in self.utts if u not in table]
            if missing:
                raise DataError(f"{d.file(name)}: {len(missing)} utterance(s) of wav.scp missing, e.g. "
                                f"{missing[0]} (run utils/validate_data_dir.sh {d.path})")
        unknown = sorted({self.utt2img[u] for u in self.utts} - set(self.img))
        if unknown:
            raise DataError(f"{d.file('utt2img')}: image {unknown[0]} not in img.scp "
                            f"({len(unknown)} such image(s))")
        self.image_ids: List[str] = sorted(self.img, key=sort_key)
        self.image_index: Dict[str, int] = {i: k for k, i in enumerate(self.image_ids)}
        self.image_embeds = self._open_embeds(image_embeds)

    def _open_embeds(self, source: EmbedSource) -> Optional[Mapping[str, Any]]:
        if source is None:
            return None
        if isinstance(source, (str, os.PathLike)):
            from speechclip_plus.data.kaldi_ark import EmbeddingScp  # a reader that never unpickles

            path = os.fspath(source)
            embeds: Mapping[str, Any] = EmbeddingScp(path)
            where = path
        else:
            embeds, where = source, "image_embeds"
        missing = sorted({self.utt2img[u] for u in self.utts} - set(embeds.keys()))
        if missing:
            raise DataError(f"{where}: no embedding for {len(missing)} image(s) of {self.data_dir.path}, "
                            f"e.g. {missing[0]} (recompute stage 2)")
        return embeds

    def __len__(self) -> int:
        return len(self.utts)

    def durations(self) -> List[float]:
        """Seconds per item, from ``utt2dur`` (stage 1) or else from each file's header (slower)."""
        durs = self.data_dir.utt2dur
        if durs is not None:
            missing = [u for u in self.utts if u not in durs]
            if missing:
                raise DataError(f"{self.data_dir.file('utt2dur')}: {missing[0]}: missing (rerun stage 1)")
            return [durs[u] for u in self.utts]
        return [audio_duration(self.wav[u]) for u in self.utts]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        utt = self.utts[index]
        image_id = self.utt2img[utt]
        item: Dict[str, Any] = {
            "utt": utt,
            "wav": torch.from_numpy(load_audio(self.wav[utt], self.sample_rate)),
            "image_id": image_id,
            "image_index": self.image_index[image_id],
            "image_embed": None,
            "text": self.text[utt],
        }
        if self.image_embeds is not None:
            vec = np.asarray(self.image_embeds[image_id], dtype=np.float32)
            if vec.ndim != 1:
                raise DataError(f"image embedding of {image_id}: expected a vector, got shape {vec.shape}")
            item["image_embed"] = torch.from_numpy(vec.copy())
        elif self.image_loader is not None:
            item["image"] = self.image_loader(self.img[image_id])
        return item


def collate(items: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Batch items: ``wav`` (B, L_max) zero-padded after each signal, ``wav_len`` (B,) long,
    ``image_index`` (B,) long, ``image_embed`` (B, D) (absent when items have none), ``image`` (B, ...) when
    items have one, and the lists ``utt``, ``text``, ``image_id``."""
    if not items:
        raise ValueError("collate: empty batch")
    lengths = [int(it["wav"].shape[0]) for it in items]
    wav = torch.zeros(len(items), max(lengths), dtype=torch.float32)
    for row, (it, n) in enumerate(zip(items, lengths)):
        wav[row, :n] = it["wav"]
    batch: Dict[str, Any] = {
        "utt": [it["utt"] for it in items],
        "wav": wav,
        "wav_len": torch.tensor(lengths, dtype=torch.long),
        "image_index": torch.tensor([it["image_index"] for it in items], dtype=torch.long),
        "text": [it["text"] for it in items],
        "image_id": [it["image_id"] for it in items],
    }
    embeds = [it.get("image_embed") for it in items]
    if any(e is not None for e in embeds):
        if any(e is None for e in embeds):
            raise ValueError("collate: some items have an image_embed and some do not")
        batch["image_embed"] = torch.stack(embeds)
    if any("image" in it for it in items):
        if not all("image" in it for it in items):
            raise ValueError("collate: some items have an image and some do not")
        batch["image"] = torch.stack([it["image"] for it in items])
    return batch

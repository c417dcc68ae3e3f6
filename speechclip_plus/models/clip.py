"""The frozen CLIP: image/text encoders, the reduced keyword vocabulary and the keyword -> text-encoder path.

Everything is open_clip's own (``create_model_and_transforms``, ``get_tokenizer``, the text transformer,
``ln_final``, ``text_projection``, positional embedding); this module only adds the SpeechCLIP+ parts (the
reference's ``ClipModel`` in ``avssl/module/clip_official.py`` of ShampooWang/SpeechCLIP_plus):
- a *reduced vocabulary*: the original CLIP token ids seen in the training captions, in file order (by
  frequency). ``token_table`` (V, token_dim) holds their frozen embedding rows; the keyword quantiser picks
  rows of it. ``special_mask`` marks pad (id 0), SOT and EOT by id, so they can never be picked (the
  reference masks reduced positions 0, 2, 3, which are those tokens only in its own frequency-ordered files).
- ``encode_keywords``: a prompt [SOT, kw_1 .. kw_K_b, EOT, pad ...] of continuous keyword vectors through the
  frozen text encoder, pooled at EOT. With keyword vectors equal to the embeddings of a sentence's tokens it
  equals ``encode_text`` of that sentence.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_write_text

PAD_ID = 0  # open_clip's tokenizer pads with id 0 ("!")

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def check_values(ok: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless the boolean tensor ``ok`` is true. On an accelerator the check runs on
    the device (``torch._assert_async``) so that it never waits for the host."""
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


# ---------------------------------------------------------------------------------------------- vocabulary
def load_vocab_usage(path: PathLike) -> List[int]:
    """Original CLIP token ids of a reduced vocabulary, in file order.

    Formats: ``.npy`` integer array (N, 2) of (token id, count) rows (the reference's
    ``text_clip_vocab_usage_byfreq.npy``), or text with one ``<token id> <count>`` per line (blank lines and
    lines starting with ``#`` are skipped). Ids must be distinct and >= 0; counts >= 0.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vocabulary usage file not found: {path}")
    ids: List[int] = []
    where: dict = {}
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a plain numpy array ({e})") from e
        if arr.ndim != 2 or arr.shape[1] != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"{path}: expected an integer array of shape (N, 2), got {arr.dtype} {arr.shape}"
            )
        rows = [(f"{path}:row {i}", int(a), int(b)) for i, (a, b) in enumerate(arr.tolist())]
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                fields = text.split()
                try:
                    if len(fields) != 2:
                        raise ValueError
                    rows.append((f"{path}:{lineno}", int(fields[0]), int(fields[1])))
                except ValueError:
                    raise ValueError(
                        f"{path}:{lineno}: expected '<token id> <count>', got {text!r}"
                    ) from None
    for loc, token_id, count in rows:
        if token_id < 0 or count < 0:
            raise ValueError(f"{loc}: negative token id or count ({token_id}, {count})")
        if token_id in where:
            raise ValueError(f"{loc}: token id {token_id} repeated (first at {where[token_id]})")
        where[token_id] = loc
        ids.append(token_id)
    if not ids:
        raise ValueError(f"{path}: no token ids")
    return ids


def save_vocab_usage(path: PathLike, ids: Sequence[int], counts: Sequence[int]) -> None:
    """Write ``<token id> <count>`` lines (the text format of ``load_vocab_usage``), atomically."""
    ids, counts = [int(i) for i in ids], [int(c) for c in counts]
    if len(ids) != len(counts):
        raise ValueError(f"save_vocab_usage({path}): {len(ids)} ids but {len(counts)} counts")
    atomic_write_text(path, "".join(f"{i} {c}\n" for i, c in zip(ids, counts)))


# ---------------------------------------------------------------------------------------------- model
class _DropMessage(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _without_random_init_warning():
    """open_clip warns on the root logger that a model built without pretrained weights is "initialized
    randomly"; FrozenCLIP says itself what it loads, so that line is left out while the model is built."""
    drop = _DropMessage("No pretrained weights loaded for model")
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _resolve_model_name(name: str) -> str:
    """open_clip architecture name; a ``.json`` model config is registered with open_clip under its stem."""
    import open_clip

    if not (str(name).endswith(".json") or os.path.isfile(str(name))):
        return str(name)
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid json ({e.msg})") from e
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"{path}: not an open_clip model config (missing keys: {', '.join(missing)})")
    known = open_clip.get_model_config(path.stem)
    if known is None:
        open_clip.add_model_config(path)
    elif known != cfg:
        raise ValueError(
            f"{path}: open_clip already has a different model config named '{path.stem}'; rename the file"
        )
    return path.stem


class FrozenCLIP(nn.Module):
    """A frozen open_clip CLIP with a reduced keyword vocabulary.

    name: open_clip architecture (``ViT-B-32``) or path to an open_clip model-config ``.json``.
    pretrained: open_clip tag (``openai``: downloads), path to a ``state_dict`` of the open_clip model (loaded
        by open_clip's own checkpoint loader, strict), or None (random init; load weights later).
    vocab: None (all tokens), a usage file (``load_vocab_usage``) or a sequence of original token ids.
    quick_gelu: activation of the towers. None = what the pretrained tag was trained with (True for OpenAI
        weights, as in the OpenAI ``clip`` package the reference used), else the model config's. It has no
        weights, so a model rebuilt for ``load_state_dict`` must be given the same value
        (``self.quick_gelu``).
    All parameters are frozen and the module stays in eval mode.
    """

    def __init__(
        self,
        name: str = "ViT-B-32",
        pretrained: Optional[str] = "openai",
        vocab: Union[None, PathLike, Sequence[int]] = None,
        quick_gelu: Optional[bool] = None,
    ):
        super().__init__()
        import open_clip

        model_name = _resolve_model_name(name)
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model '{name}' (see open_clip.list_models())")
        if quick_gelu is None:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
            quick_gelu = bool(tag_cfg.get("quick_gelu", False)) or bool(model_cfg.get("quick_gelu", False))
        if (
            pretrained
            and not open_clip.get_pretrained_cfg(model_name, pretrained)
            and not os.path.isfile(pretrained)
        ):
            raise FileNotFoundError(
                f"CLIP pretrained='{pretrained}' is neither an open_clip tag of {model_name} "
                f"({', '.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none'}) nor a file"
            )
        with _without_random_init_warning():
            clip, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None, force_quick_gelu=bool(quick_gelu)
            )
        if pretrained:
            log.info("CLIP %s: weights %s", name, pretrained)
        else:
            log.info("CLIP %s: built without pretrained weights (random until a state dict is loaded)", name)
        self.name = str(name)
        self.quick_gelu = bool(quick_gelu or model_cfg.get("quick_gelu", False))
        self.clip = clip
        self._preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        for attr in ("encode", "decoder", "byte_decoder", "sot_token_id", "eot_token_id"):
            if not hasattr(self.tokenizer, attr):
                raise NotImplementedError(
                    f"CLIP '{name}': needs open_clip's BPE SimpleTokenizer (no '{attr}')"
                )
        self.sot_id = int(self.tokenizer.sot_token_id)
        self.eot_id = int(self.tokenizer.eot_token_id)

        text = self._text
        if text is None or not hasattr(text, "token_embedding") or getattr(text, "attn_mask", None) is None:
            raise NotImplementedError(f"CLIP '{name}': keywords need a causal open_clip text transformer")
        pool = getattr(text, "text_pool_type", getattr(text, "pool_type", None))
        if pool not in ("argmax", "eos") or getattr(text, "cls_emb", None) is not None:
            raise NotImplementedError(f"CLIP '{name}': keywords need EOT pooling (text pool type is {pool})")
        self.context_length = int(text.positional_embedding.shape[0])
        self.full_vocab_size = int(text.token_embedding.weight.shape[0])

        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

        ids = self._vocab_ids(vocab)
        self.register_buffer("vocab_ids", torch.tensor(ids, dtype=torch.long))
        self.register_buffer("_to_reduced", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("_special_mask", torch.empty(0, dtype=torch.bool), persistent=False)
        self._refresh_maps()
        self.register_load_state_dict_post_hook(FrozenCLIP._after_load)
        self.register_load_state_dict_pre_hook(FrozenCLIP._log_loaded)

    # ------------------------------------------------------------------ setup helpers
    def _vocab_ids(self, vocab) -> List[int]:
        if vocab is None:
            return list(range(self.full_vocab_size))
        source = str(vocab) if isinstance(vocab, (str, os.PathLike)) else "vocab"
        ids = load_vocab_usage(vocab) if isinstance(vocab, (str, os.PathLike)) else [int(i) for i in vocab]
        if not ids:
            raise ValueError(f"{source}: empty vocabulary")
        bad = [i for i in ids if not 0 <= i < self.full_vocab_size]
        if bad:
            raise ValueError(
                f"{source}: token ids outside CLIP's vocabulary [0, {self.full_vocab_size}): {bad[:5]}"
            )
        if len(set(ids)) != len(ids):
            raise ValueError(f"{source}: repeated token ids")
        return ids

    @property
    def _text(self) -> Optional[nn.Module]:
        """The module holding the text tower (the CLIP itself, or ``.text`` of a CustomTextCLIP)."""
        return self.clip if hasattr(self.clip, "transformer") else getattr(self.clip, "text", None)

    @staticmethod
    def _after_load(module: "FrozenCLIP", incompatible_keys) -> None:
        module._refresh_maps()

    @staticmethod
    def _log_loaded(module: "FrozenCLIP", state_dict, prefix, *args) -> None:
        """Say what a ``load_state_dict`` brings to the CLIP (a model file or checkpoint holding its weights)."""
        n = sum(1 for k in state_dict if k.startswith(prefix + "clip."))
        if n:
            total = sum(1 for k in module.state_dict() if k.startswith("clip."))
            log.info("CLIP %s: %d of its %d tensors loaded from the model's state dict", module.name, n, total)

    def _refresh_maps(self) -> None:
        """Rebuild the derived maps from ``vocab_ids`` (also after ``load_state_dict``)."""
        ids = self.vocab_ids
        table = torch.full((self.full_vocab_size,), -1, dtype=torch.long, device=ids.device)
        table[ids] = torch.arange(len(ids), device=ids.device)
        self._to_reduced = table
        self._special_mask = (ids == PAD_ID) | (ids == self.sot_id) | (ids == self.eot_id)

    def train(self, mode: bool = True) -> "FrozenCLIP":
        """Always eval: CLIP is frozen, so ``model.train()`` of a parent must not enable its dropout."""
        return super().train(False)

    # ------------------------------------------------------------------ sizes and tables
    @property
    def embed_dim(self) -> int:
        """Joint image/text embedding dim (= text_projection.shape[1]; equal to the token width only for some
        CLIPs, e.g. ViT-B/32 and ViT-L/14, which the reference's parallel projection assumed)."""
        proj = self._text.text_projection
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    @property
    def token_dim(self) -> int:
        return int(self._text.token_embedding.weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.vocab_ids.numel())

    @property
    def token_table(self) -> torch.Tensor:
        """(V, token_dim) frozen embedding rows of the reduced vocabulary, in ``vocab_ids`` order."""
        return self._text.token_embedding.weight[self.vocab_ids]

    @property
    def special_mask(self) -> torch.Tensor:
        """(V,) bool: True at pad (id 0), SOT and EOT."""
        return self._special_mask

    def to_reduced(self, ids: torch.Tensor) -> torch.Tensor:
        """Original ids (any shape) -> reduced ids; -1 where the token is not in the reduced vocabulary."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.vocab_ids.device)
        if ids.numel():
            check_values(((ids >= 0) & (ids < self.full_vocab_size)).all(),
                         f"to_reduced: ids outside [0, {self.full_vocab_size})")
        return self._to_reduced[ids]

    def to_original(self, ids: torch.Tensor) -> torch.Tensor:
        """Reduced ids (any shape) -> original CLIP ids."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.vocab_ids.device)
        if ids.numel():
            check_values(((ids >= 0) & (ids < self.vocab_size)).all(),
                         f"to_original: reduced ids outside [0, {self.vocab_size})")
        return self.vocab_ids[ids]

    # ------------------------------------------------------------------ tokenizer
    def tokenize_ids(self, texts: Sequence[str]) -> List[List[int]]:
        """CLIP BPE ids of each text (open_clip's cleaning: lower case, whitespace); no SOT/EOT/pad."""
        return [list(self.tokenizer.encode(t)) for t in texts]

    def decode_ids(self, ids: Sequence[int]) -> List[str]:
        """Token strings of original ids, keeping CLIP's '</w>' end-of-word marker (``dog</w>``)."""
        out = []
        for i in ids:
            token = self.tokenizer.decoder[int(i)]
            if token in ("<start_of_text>", "<end_of_text>"):
                out.append(token)
                continue
            eow = token.endswith("</w>")
            body = token[:-4] if eow else token
            text = bytes(self.tokenizer.byte_decoder[c] for c in body).decode("utf-8", errors="replace")
            out.append(text + ("</w>" if eow else ""))
        return out

    # ------------------------------------------------------------------ encoders
    @property
    def device(self) -> torch.device:
        return self.vocab_ids.device

    def preprocess(self, pil_image) -> torch.Tensor:
        """open_clip's eval transform for this model: PIL image -> (3, H, W) float tensor."""
        return self._preprocess(pil_image)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> L2-normalised embeddings (B, embed_dim)."""
        return self.clip.encode_image(images.to(self.device), normalize=True)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> L2-normalised (B, embed_dim): open_clip tokenizer (truncating) + CLIP.encode_text."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.clip.encode_text(tokens, normalize=True)

    def encode_keywords(self, keywords: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Keyword vectors (B, K, token_dim), ``lengths`` (B,) used per sample -> (B, embed_dim) unit norm.

        Prompt b = [SOT, kw_1 .. kw_{L_b}, EOT, pad ...] over CLIP's context (SOT/EOT/pad rows from CLIP's
        table; slots past L_b are ignored), + positional embedding -> causal text transformer -> ln_final ->
        state at EOT (position L_b + 1) -> text projection -> L2 norm. Gradients flow into ``keywords``.
        """
        if keywords.dim() != 3 or keywords.shape[-1] != self.token_dim:
            raise ValueError(
                f"encode_keywords: expected (B, K, {self.token_dim}), got {tuple(keywords.shape)}"
            )
        bsz, k = keywords.shape[:2]
        ctx = self.context_length
        if k + 2 > ctx:
            raise ValueError(f"encode_keywords: {k} keywords + SOT + EOT exceed CLIP's context of {ctx}")
        device = keywords.device
        if lengths is None:
            lengths = torch.full((bsz,), k, dtype=torch.long, device=device)
        lengths = lengths.to(device=device, dtype=torch.long)
        if lengths.shape != (bsz,):
            raise ValueError(f"encode_keywords: lengths must be (B,) = ({bsz},), got {tuple(lengths.shape)}")
        if bsz:
            check_values(((lengths >= 0) & (lengths <= k)).all(), f"encode_keywords: lengths must be in [0, {k}]")

        text = self._text
        cast_dtype = text.transformer.get_cast_dtype()
        # The text transformer is causal, so the EOT state depends only on positions <= EOT: run it over the
        # K + 2 positions the prompts can use instead of the whole context (same output, no host read).
        n = k + 2
        pos = torch.arange(n, device=device)
        eot_pos = lengths + 1
        ids = torch.full((bsz, n), PAD_ID, dtype=torch.long, device=device)
        ids[:, 0] = self.sot_id
        ids[torch.arange(bsz, device=device), eot_pos] = self.eot_id
        x = text.token_embedding(ids).to(cast_dtype)
        slots = F.pad(keywords[:, : n - 2].to(cast_dtype), (0, 0, 1, 1))  # keyword j at position j + 1
        use = (pos[None, :] >= 1) & (pos[None, :] <= lengths[:, None])
        x = torch.where(use[..., None], slots, x)
        x = x + text.positional_embedding[:n].to(cast_dtype)
        mask = text.attn_mask[:n, :n] if text.attn_mask is not None else None
        x = text.transformer(x, attn_mask=mask)
        x = text.ln_final(x)
        x = x[torch.arange(bsz, device=device), eot_pos]
        proj = text.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)

    def extra_repr(self) -> str:
        return f"name={self.name}, quick_gelu={self.quick_gelu}, vocab_size={self.vocab_size}"

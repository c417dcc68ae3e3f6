"""The SpeechCLIP / SpeechCLIP+ model family, assembled from the ``model`` config section.

Data flow, shared by every variant (as in the reference's branches, ``avssl/model/kw_branches.py`` of
ShampooWang/SpeechCLIP_plus):
  wav -> [train: random crop to max_audio_len] -> frozen upstream -> softmax-weighted sum (B, T, D)
      -> [optional convolutional positional embedding, encoder.conv_pos]
      -> prepend the variant's CLS tokens -> one trainable attention block (shared by the branches)
  p      : CLS_p                 -> ParallelBranch                       -> parallel embedding
  c      : CLS_1..K              -> KeywordHead (per-slot BN)            -> cascaded embedding
  cplus  : frames -> CIF         -> KeywordHead (masked BN)              -> cascaded embedding
  h      : [CLS_p; CLS_1..K]     -> both of the above (p and c)
  hplus  : [CLS_p; frames]       -> CLS_p to ParallelBranch, frames to CIF + KeywordHead
Loss: L = w_p CL(parallel, image) + w_c CL(cascaded, image) + w_q L_QUA (CIF variants), each term present
only for the branches the variant has. CLIP and the upstream are frozen; trainable: layer weights, CLS
tokens, attention block, branch heads, CIF weight predictor, the contrastive temperature (one, shared by the
branches as in the reference, or one per branch with ``loss.per_branch_temperature``).

Every deliberate difference from the reference, and how to get its behaviour, is listed in
docs/faithfulness.md.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import model_config
from .attention import AttentionBlock, ConvPositionalEmbedding
from .branches import KeywordHead, ParallelBranch
from .cif import CIF, duration_targets, quantity_loss
from .clip import FrozenCLIP
from .losses import MaskedContrastiveLoss
from .upstream import Upstream

PARALLEL_VARIANTS = ("p", "h", "hplus")
FIXED_KEYWORD_VARIANTS = ("c", "h")
CIF_VARIANTS = ("cplus", "hplus")


def random_crop(wav: torch.Tensor, wav_len: torch.Tensor, max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Crop each utterance longer than ``max_len`` samples at a uniformly random offset.

    The uniform draws come from the CPU generator (the same crops on any device for a seed) and are moved to the
    waveforms' device; nothing is read back to the host."""
    if wav.shape[1] <= max_len:
        return wav, wav_len
    wav_len = wav_len.to(wav.device)
    room = (wav_len - max_len).clamp(min=0)
    u = torch.rand(len(wav_len), device="cpu").to(wav.device)
    offset = torch.minimum((u * (room + 1).float()).long(), room)
    index = offset[:, None] + torch.arange(max_len, device=wav.device)[None, :]
    cropped = wav.gather(1, index.clamp(max=wav.shape[1] - 1))
    new_len = wav_len.clamp(max=max_len)
    cropped = cropped * (torch.arange(max_len, device=wav.device)[None, :] < new_len[:, None])
    return cropped, new_len


class SpeechCLIP(nn.Module):
    """All five variants; built from the ``model`` config alone (``vocab_ids`` overrides ``clip.vocab``)."""

    def __init__(self, cfg: Dict, vocab_ids: Optional[Sequence[int]] = None, clip_pretrained: Optional[str] = "config"):
        super().__init__()
        cfg = model_config(cfg)
        self.cfg = cfg
        self.variant = cfg["variant"]
        up = cfg["upstream"]
        self.upstream = Upstream(up["name"], up["ckpt"], up["normalize_waveform"], up["normalize_hiddenstates"],
                                 per_utterance=up["per_utterance"], model_config=up["model_config"],
                                 raw_last_layer=up["raw_last_layer"])
        pretrained = cfg["clip"]["pretrained"] if clip_pretrained == "config" else clip_pretrained
        self.clip = FrozenCLIP(cfg["clip"]["name"], pretrained, vocab_ids if vocab_ids is not None else cfg["clip"]["vocab"],
                               quick_gelu=cfg["clip"]["quick_gelu"])
        d_model = self.upstream.hidden_dim

        self.has_parallel = self.variant in PARALLEL_VARIANTS
        self.n_fixed = cfg["cascaded"]["n_keywords"] if self.variant in FIXED_KEYWORD_VARIANTS else 0
        self.has_cif = self.variant in CIF_VARIANTS
        self.n_cls = int(self.has_parallel) + self.n_fixed
        self.cls = nn.Parameter(torch.randn(1, self.n_cls, d_model)) if self.n_cls else None
        enc = cfg["encoder"]
        self.pos_conv = (ConvPositionalEmbedding(d_model, enc["conv_pos"], enc["conv_pos_groups"])
                         if enc["conv_pos"] else None)
        self.encoder = AttentionBlock(d_model, enc["type"], enc["n_heads"], enc["n_layers"], enc["ffn_dim"], enc["dropout"],
                                      enc["attention_dropout"])

        if self.has_parallel:
            self.parallel = ParallelBranch(d_model, self.clip.embed_dim, cfg["parallel"]["projection"])
        if self.n_fixed or self.has_cif:
            c = cfg["cascaded"]
            self.keywords = KeywordHead(d_model, self.clip.token_table, self.n_fixed or None, c["projection"],
                                        c["bn_std_scale"], c["vq_temperature"])
        if self.has_cif:
            f = cfg["cif"]
            self.cif = CIF(d_model, threshold=f["threshold"], max_length=f["max_keywords"], conv_width=f["conv_width"],
                           conv_layers=f["conv_layers"], dropout=f["dropout"], scaling_steps=f["scaling_steps"],
                           tail_threshold=f["tail_threshold"])
        lc = cfg["loss"]
        self.contrastive = MaskedContrastiveLoss(lc["temperature"], lc["learnable_temperature"], lc["max_logit_scale"])
        self.contrastive_cascaded = None  # the cascaded branch's own temperature (hybrids, per_branch_temperature)
        if lc["per_branch_temperature"] and len(self.branches) == 2:
            self.contrastive_cascaded = MaskedContrastiveLoss(lc["temperature"], lc["learnable_temperature"],
                                                              lc["max_logit_scale"])

    # ------------------------------------------------------------------ properties
    @property
    def branches(self) -> List[str]:
        return (["parallel"] if self.has_parallel else []) + (["cascaded"] if (self.n_fixed or self.has_cif) else [])

    @property
    def retrieval_branch(self) -> str:
        return self.cfg["retrieval_branch"] or self.branches[0]

    def extra_repr(self) -> str:
        return f"variant={self.variant}"

    # ------------------------------------------------------------------ encoder
    def encode_frames(self, wav: torch.Tensor, wav_len: torch.Tensor):
        """Upstream + weighted sum + attention block.

        Returns (encoder output (B, n_cls + T, D), pad mask (B, n_cls + T), feat_lens (B,), upstream states).
        """
        states, feat_lens = self.upstream.hidden_states(wav, wav_len)
        feats = self.upstream.weighted_sum(states)
        pad = torch.arange(feats.shape[1], device=feats.device)[None, :] >= feat_lens[:, None]
        if self.pos_conv is not None:
            feats = self.pos_conv(feats, pad)
        if self.n_cls:
            feats = torch.cat([self.cls.expand(len(feats), -1, -1).to(feats.dtype), feats], 1)
            pad = torch.cat([pad.new_zeros(len(pad), self.n_cls), pad], 1)
        return self.encoder(feats, pad), pad, feat_lens, states

    def hidden_states(self, wav: torch.Tensor, wav_len: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Frame-level states for SUPERB: every upstream state plus the attention block's frame outputs; frames at
        or past ``feat_lens`` are zero in all of them."""
        out, pad, feat_lens, states = self.encode_frames(wav, wav_len)
        frames = out[:, self.n_cls:].masked_fill(pad[:, self.n_cls:, None], 0.0)
        return list(states) + [frames], feat_lens

    def cif_targets(self, feat_lens: torch.Tensor, texts: Optional[Sequence[str]] = None,
                    target_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Keyword-count targets: given ``target_lengths``, else by ``cif.target`` (duration | clip_bpe)."""
        f = self.cfg["cif"]
        if target_lengths is not None:
            return target_lengths.to(feat_lens.device).long().clamp(1, f["max_keywords"])
        if f["target"] == "duration":
            return duration_targets(feat_lens, self.upstream.downsample_rate, 16000, f["seconds_per_keyword"],
                                    f["max_keywords"])
        if f["target"] == "clip_bpe":
            if texts is None:
                raise ValueError("model.cif.target=clip_bpe needs the transcriptions (texts)")
            counts = [len(ids) for ids in self.clip.tokenize_ids(list(texts))]
            return torch.tensor(counts, device=feat_lens.device).clamp(1, f["max_keywords"])
        raise ValueError(f"model.cif.target={f['target']} needs target_lengths from the data pipeline")

    # ------------------------------------------------------------------ forward
    def forward(self, wav: torch.Tensor, wav_len: torch.Tensor, image_embed: Optional[torch.Tensor] = None,
                image_index: Optional[torch.Tensor] = None, step: Optional[int] = None,
                texts: Optional[Sequence[str]] = None, target_lengths: Optional[torch.Tensor] = None) -> Dict:
        """Embed a padded batch of 16 kHz waveforms; with ``image_embed`` and ``image_index`` also the loss.

        Returns a dict with ``parallel`` / ``cascaded`` (B, E) unit-norm embeddings (those the variant has),
        ``keyword_ids`` (B, K) original CLIP ids (-1 = padding), ``keyword_neighbours`` (B, K, 5),
        ``keyword_lengths`` (B,), for CIF variants ``cif_alpha`` (B, T), ``cif_fire_mask`` (B, T),
        ``cif_targets`` (B,) when known (always in training); ``feat_lens`` (B,); and, given images, ``loss``,
        ``weighted`` and ``terms`` (see ``loss``).
        """
        max_len = self.cfg["max_audio_len"]
        if self.training and max_len:
            wav, wav_len = random_crop(wav, wav_len, max_len)
        enc, pad, feat_lens, _ = self.encode_frames(wav, wav_len)
        out: Dict = {"feat_lens": feat_lens}
        if self.has_parallel:
            out["parallel"] = self.parallel(enc[:, 0])
        if self.n_fixed:
            start = int(self.has_parallel)
            lengths = torch.full((len(enc),), self.n_fixed, dtype=torch.long, device=enc.device)
            kw = self.keywords(enc[:, start:start + self.n_fixed], self.clip, lengths)
        if self.has_cif:
            frames, frame_pad = enc[:, self.n_cls:], pad[:, self.n_cls:]
            known = target_lengths is not None or self.cfg["cif"]["target"] == "duration" or (
                self.cfg["cif"]["target"] == "clip_bpe" and texts is not None)
            # Training needs targets; at inference they are only reported (count error, L_QUA on validation).
            targets = self.cif_targets(feat_lens, texts, target_lengths) if (self.training or known) else None
            with torch.autocast(enc.device.type, enabled=False):
                c = self.cif(frames.float(), frame_pad, targets if self.training else None, step)
            kw = self.keywords(c.feats, self.clip, c.lengths, c.pad_mask)
            out.update(cif_alpha=c.alpha, cif_fire_mask=c.fire_mask, cif_quantity=c.quantity)
            if targets is not None:
                out["cif_targets"] = targets
        if self.n_fixed or self.has_cif:
            out.update(cascaded=kw["embedding"], keyword_ids=kw["ids"], keyword_neighbours=kw["neighbours"],
                       keyword_lengths=kw["lengths"])
        if image_embed is not None:
            if image_index is None:
                raise ValueError("the loss needs image_index (which utterances share an image)")
            out.update(self.loss(out, image_embed, image_index))
        return out

    def loss(self, out: Dict, image_embed: torch.Tensor, image_index: torch.Tensor) -> Dict:
        """``loss`` = the sum of ``weighted`` (each term times its config weight, with graph); ``terms``: the
        unweighted terms and a few statistics as detached 0-d tensors (read them on the host only when logging,
        so a step needs no host synchronisation)."""
        image = nn.functional.normalize(image_embed.float(), dim=-1)
        terms, weighted = {}, {}
        if self.has_parallel:
            terms["cl_parallel"] = self.contrastive(out["parallel"], image, image_index)
            weighted["cl_parallel"] = self.cfg["parallel"]["weight"] * terms["cl_parallel"]
        if "cascaded" in out:
            terms["cl_cascaded"] = (self.contrastive_cascaded or self.contrastive)(out["cascaded"], image, image_index)
            weighted["cl_cascaded"] = self.cfg["cascaded"]["weight"] * terms["cl_cascaded"]
        if self.has_cif:
            if "cif_targets" in out:
                terms["quantity"] = quantity_loss(out["cif_quantity"], out["cif_targets"])
                weighted["quantity"] = self.cfg["cif"]["quantity_weight"] * terms["quantity"]
            terms["keyword_count"] = out["keyword_lengths"].float().mean()
        terms["logit_scale"] = self.contrastive.logit_scale
        if self.contrastive_cascaded is not None:
            terms["logit_scale_cascaded"] = self.contrastive_cascaded.logit_scale
        total = sum(weighted.values())
        return {"loss": total, "weighted": weighted, "terms": {k: v.detach() for k, v in terms.items()}}

    # ------------------------------------------------------------------ helpers
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> unit-norm CLIP image embeddings (B, E)."""
        return self.clip.encode_image(images)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_model(cfg: Dict, **kwargs) -> SpeechCLIP:
    """Model from a full config (or its ``model`` section)."""
    return SpeechCLIP(cfg["model"] if "model" in cfg else cfg, **kwargs)

"""Map every tensor of a reference state dict onto ``SpeechCLIP``'s names and layouts.

Reference names (``KWClip_GeneralTransformer`` in avssl/model/kwClip.py and the branches of
avssl/model/kw_branches.py; ``B`` = ``parallel_branch`` for p, ``cascaded_branch`` otherwise):

| reference | ours |
|---|---|
| ``audio_encoder.weightedsum_layer.weights`` | ``upstream.layer_weights`` |
| ``audio_encoder.encoder.[model.]*`` (frozen HuBERT) | ``upstream.upstream.model.*`` |
| ``clip.model.*`` (frozen CLIP, OpenAI names = open_clip names) | ``clip.clip.*`` |
| ``clip.model.token_embedding.weight`` (V, D), the *reduced* table | ``clip.clip.token_embedding.weight[vocab_ids]`` |
| ``B.cls``; for h ``cascaded_branch.{parallel_cls, cascaded_cls}`` | ``cls`` (parallel CLS first) |
| ``B.self_att.{multihead_attn_layer, attentionBlock_Norm}.*`` (MHA + norm block) | ``encoder.{attn, norm}.*`` |
| ``B.self_att.model.{layers.N, norm}.*`` (TransformerEncoder) | ``encoder.layers.{layers.N, norm}.*`` |
| ``parallel_branch.linear_proj`` (p), ``cascaded_branch.parallel_proj`` (h, h+) | ``parallel.proj`` |
| ``cascaded_branch.linear_proj`` | ``keywords.proj`` |
| ``*.sequential.{0,3,..}`` (``MLPLayers``: Linear, ReLU, Dropout blocks) | ``*.{0,3,..}`` (same indices) |
| ``cascaded_branch.bn_layer.bn_layer.*`` | ``keywords.bn.bn.*`` (fixed K: permuted, below) |
| ``cascaded_branch.downsampling.conv.{3i}`` / ``.weight_proj.1`` | ``cif.convs.{i}`` / ``cif.proj`` |
| ``criterion.temperature`` (log of the logit scale, if trainable) | ``contrastive.log_scale`` |

Layout quirks handled here:
- CLIP is registered twice (``clip.*`` and ``cascaded_branch.clip.*``): the second copy must equal the first
  and is then ignored.
- The reduced token table is (V, D), not CLIP's (49408, D); with ``clip.original_text_emb_weight`` (the full
  table the reference keeps as a parameter) it is returned for the vocabulary check.
- Fixed-K keyword BatchNorm (c, h) flattens (B, D, K) d-major (index d*K + k); ours flattens (B, K, D)
  (index k*D + d), so every per-feature vector is permuted. A single BatchNorm over D (``type: same``) is
  tiled over the K slots; per-slot ``bn_layers.N`` (``parallel: false``) are concatenated.
- Two attention-block layouts (above); ``parametrizations.weight.original0/1`` (newer PyTorch weight norm)
  are read as HuBERT's ``weight_g`` / ``weight_v``.
Every other key is an error naming it (``IGNORED`` lists the keys skipped on purpose, with the reason).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

OUR_UPSTREAM = "upstream.upstream.model."
OUR_CLIP = "clip.clip."
UPSTREAM_PREFIX = {"FairseqHubert": "audio_encoder.encoder.", "s3prl_plus": "audio_encoder.encoder.model."}
WEIGHT_NORM_ALIASES = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
CLS_KEYS = {"p": ["parallel_branch.cls"], "c": ["cascaded_branch.cls"], "cplus": [],
            "h": ["cascaded_branch.parallel_cls", "cascaded_branch.cascaded_cls"], "hplus": ["cascaded_branch.cls"]}
FIXED_K = ("c", "h")
CIF_VARIANTS = ("cplus", "hplus")

IGNORED = {
    "cascaded_branch.clip.*": "second registration of the shared CLIP (the branch keeps a reference to it); "
                              "checked equal to the clip.* copy",
    "criterion.eye_mat, criterion.neg_eye_mat, criterion.eye_mat_fl": "constant diagonal masks of the reference "
                                                                      "loss; rebuilt from each batch here",
    "<branch>.vector_quantizer.curr_temp": "the quantiser's fixed temperature; checked against "
                                           "model.cascaded.vq_temperature",
}
UNSUPPORTED = {
    r"(img_enc_proj_net|p_branch_proj_net|c_branch_proj_net)\.": "an extra projection network after an encoder",
    r"cascaded_branch\.downsampling\.(cif_output_proj|dense_proj)\.": "a CIF output projection / dense weight "
                                                                       "predictor",
}


class ReferenceWeightsError(ValueError):
    """A reference tensor that cannot be mapped (message names the key)."""


@dataclass
class MappedWeights:
    """A reference state dict split by destination (see the module docstring)."""

    trainable: Dict[str, torch.Tensor] = field(default_factory=dict)  # our key -> tensor (our layout)
    sources: Dict[str, str] = field(default_factory=dict)  # our key -> reference key(s)
    upstream: Dict[str, torch.Tensor] = field(default_factory=dict)  # frozen upstream, our keys
    clip: Dict[str, torch.Tensor] = field(default_factory=dict)  # frozen CLIP, our keys, token table excluded
    frozen_sources: Dict[str, str] = field(default_factory=dict)  # our frozen key -> reference key
    reduced_table: Optional[torch.Tensor] = None  # (V, D) reference clip.model.token_embedding.weight
    full_table: Optional[torch.Tensor] = None  # (49408, D) clip.original_text_emb_weight, if present
    ignored: Dict[str, List[str]] = field(default_factory=dict)  # reason -> reference keys
    vq_temperature: Optional[float] = None


def _renames(variant: str) -> List[Tuple[re.Pattern, str]]:
    b = "parallel_branch" if variant == "p" else "cascaded_branch"
    rules = [
        (r"audio_encoder\.weightedsum_layer\.weights", "upstream.layer_weights"),
        (r"criterion\.temperature", "contrastive.log_scale"),
        (rf"{b}\.self_att\.multihead_attn_layer\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
         r"encoder.attn.\1"),
        (rf"{b}\.self_att\.attentionBlock_Norm\.(weight|bias)", r"encoder.norm.\1"),
        (rf"{b}\.self_att\.model\.layers\.(\d+)\.(.+)", r"encoder.layers.layers.\1.\2"),
        (rf"{b}\.self_att\.model\.norm\.(weight|bias)", r"encoder.layers.norm.\1"),
    ]
    if variant == "p":
        rules.append((r"parallel_branch\.linear_proj\.(weight|bias)", r"parallel.proj.\1"))
    if variant in ("h", "hplus"):
        rules += [(r"cascaded_branch\.parallel_proj\.(weight|bias)", r"parallel.proj.\1"),
                  (r"cascaded_branch\.parallel_proj\.sequential\.(\d+)\.(weight|bias)", r"parallel.proj.\1.\2")]
    if variant != "p":
        rules += [(r"cascaded_branch\.linear_proj\.(weight|bias)", r"keywords.proj.\1"),
                  (r"cascaded_branch\.linear_proj\.sequential\.(\d+)\.(weight|bias)", r"keywords.proj.\1.\2")]
    if variant in CIF_VARIANTS:
        rules.append((r"cascaded_branch\.downsampling\.weight_proj\.1\.(weight|bias)", r"cif.proj.\1"))
    return [(re.compile(p), t) for p, t in rules]


_BN = re.compile(r"cascaded_branch\.bn_layer\.bn_layer\.(weight|bias|running_mean|running_var|num_batches_tracked)")
_BN_SLOTS = re.compile(r"cascaded_branch\.bn_layer\.bn_layers\.(\d+)\."
                       r"(weight|bias|running_mean|running_var|num_batches_tracked)")
_CIF_CONV = re.compile(r"cascaded_branch\.downsampling\.conv\.(\d+)\.(weight|bias)")
_VQ_TEMP = re.compile(r"(parallel|cascaded)_branch\.vector_quantizer\.curr_temp")
_LOSS_MASKS = re.compile(r"criterion\.(eye_mat|neg_eye_mat|eye_mat_fl)")


class _Collector:
    def __init__(self, variant: str, n_keywords: int, upstream_type: str):
        if upstream_type not in UPSTREAM_PREFIX:
            raise ReferenceWeightsError(f"audio encoder type {upstream_type!r} not supported "
                                        f"({', '.join(UPSTREAM_PREFIX)})")
        self.variant, self.k, self.up_prefix = variant, n_keywords, UPSTREAM_PREFIX[upstream_type]
        self.out = MappedWeights()
        self.cls: Dict[str, torch.Tensor] = {}
        self.bn_slots: Dict[str, Dict[int, torch.Tensor]] = {}
        self.bn: Dict[str, Tuple[str, torch.Tensor]] = {}
        self.renames = _renames(variant)

    def put(self, ours: str, tensor: torch.Tensor, ref: str) -> None:
        if ours in self.out.trainable:
            raise ReferenceWeightsError(f"reference keys {self.out.sources[ours]} and {ref} both map to {ours}")
        self.out.trainable[ours], self.out.sources[ours] = tensor, ref

    def ignore(self, reason: str, key: str) -> None:
        self.out.ignored.setdefault(reason, []).append(key)

    def add(self, key: str, t: torch.Tensor, state: Dict[str, torch.Tensor]) -> None:
        o = self.out
        if key.startswith(self.up_prefix):
            name = key[len(self.up_prefix):]
            for new, old in WEIGHT_NORM_ALIASES.items():
                name = name.replace(new, old)
            o.upstream[OUR_UPSTREAM + name] = t
            o.frozen_sources[OUR_UPSTREAM + name] = key
            return
        if key == "clip.model.token_embedding.weight":
            o.reduced_table = t
            return
        if key == "clip.original_text_emb_weight":
            o.full_table = t
            o.frozen_sources[OUR_CLIP + "token_embedding.weight"] = key
            return
        if key.startswith("clip.model."):
            o.clip[OUR_CLIP + key[len("clip.model."):]] = t
            o.frozen_sources[OUR_CLIP + key[len("clip.model."):]] = key
            return
        if key.startswith("cascaded_branch.clip."):
            twin = key[len("cascaded_branch."):]
            if twin not in state or not torch.equal(state[twin], t):
                raise ReferenceWeightsError(f"{key}: the branch's copy of CLIP differs from (or lacks) {twin}; "
                                            "the two registrations of the shared CLIP must hold the same tensor")
            self.ignore(IGNORED["cascaded_branch.clip.*"], key)
            return
        if _LOSS_MASKS.fullmatch(key):
            self.ignore(IGNORED["criterion.eye_mat, criterion.neg_eye_mat, criterion.eye_mat_fl"], key)
            return
        if _VQ_TEMP.fullmatch(key):
            o.vq_temperature = float(t.reshape(-1)[0]) if t.numel() == 1 else None
            if o.vq_temperature is None:
                raise ReferenceWeightsError(f"{key}: expected one temperature value, got shape {tuple(t.shape)}")
            self.ignore(IGNORED["<branch>.vector_quantizer.curr_temp"], key)
            return
        if key in CLS_KEYS[self.variant]:
            self.cls[key] = t
            return
        m = _BN.fullmatch(key)
        if m and self.variant != "p":
            self.bn[m.group(1)] = (key, t)
            return
        m = _BN_SLOTS.fullmatch(key)
        if m and self.variant in FIXED_K:
            self.bn_slots.setdefault(m.group(2), {})[int(m.group(1))] = t
            return
        m = _CIF_CONV.fullmatch(key)
        if m and self.variant in CIF_VARIANTS:
            index = int(m.group(1))
            if index % 3:
                raise ReferenceWeightsError(f"{key}: expected a convolution at index 3*i of the weight "
                                            "predictor (Conv1d, Dropout, ReLU blocks)")
            self.put(f"cif.convs.{index // 3}.{m.group(2)}", t, key)
            return
        for pattern, template in self.renames:
            m = pattern.fullmatch(key)
            if m:
                self.put(m.expand(template), t, key)
                return
        for pattern, what in UNSUPPORTED.items():
            if re.match(pattern, key):
                raise ReferenceWeightsError(f"reference key {key}: {what} is not supported by this toolkit")
        raise ReferenceWeightsError(f"reference key {key} (shape {tuple(t.shape)}) is not mapped for variant "
                                    f"{self.variant}: neither a SpeechCLIP weight nor a known ignorable key")

    def finish(self) -> MappedWeights:
        o = self.out
        if o.reduced_table is None:
            raise ReferenceWeightsError("reference key clip.model.token_embedding.weight (CLIP's reduced token "
                                        "table) is missing")
        wanted = CLS_KEYS[self.variant]
        missing = [k for k in wanted if k not in self.cls]
        if missing:
            raise ReferenceWeightsError(f"reference key {missing[0]} (CLS tokens of variant {self.variant}) is missing")
        if wanted:
            self.put("cls", torch.cat([self.cls[k] for k in wanted], dim=1), ", ".join(wanted))
        self._keyword_bn()
        return o

    def _keyword_bn(self) -> None:
        d = int(self.out.reduced_table.shape[1])
        fixed = self.variant in FIXED_K
        for name, slots in self.bn_slots.items():
            if sorted(slots) != list(range(self.k)):
                raise ReferenceWeightsError(f"cascaded_branch.bn_layer.bn_layers.*.{name}: expected slots "
                                            f"0..{self.k - 1}, got {sorted(slots)}")
            t = slots[0] if name == "num_batches_tracked" else torch.cat([slots[i] for i in range(self.k)])
            self.put(f"keywords.bn.bn.{name}", t, f"cascaded_branch.bn_layer.bn_layers.*.{name}")
        for name, (key, t) in self.bn.items():
            if name == "num_batches_tracked" or not fixed:
                self.put(f"keywords.bn.bn.{name}", t, key)
            elif t.numel() == d * self.k:  # d-major (d*K + k) -> slot-major (k*D + d)
                self.put(f"keywords.bn.bn.{name}", t.reshape(d, self.k).t().reshape(-1).contiguous(), key)
            elif t.numel() == d:  # one BatchNorm over D shared by the K slots
                self.put(f"keywords.bn.bn.{name}", t.repeat(self.k), key)
            else:
                raise ReferenceWeightsError(f"{key}: {t.numel()} values fit neither {self.k} keywords x {d} dims "
                                            f"nor {d} dims")


def map_state_dict(state: Dict[str, torch.Tensor], variant: str, n_keywords: int = 8,
                   upstream_type: str = "FairseqHubert") -> MappedWeights:
    """Split a reference state dict into our trainable weights, frozen parts and ignored keys.

    ``n_keywords``: K of the fixed-CLS variants (c, h). ``upstream_type``: the reference's
    ``audio_encoder.type`` (it decides the prefix of the frozen HuBERT). Raises ``ReferenceWeightsError``
    naming the first key that cannot be placed.
    """
    collector = _Collector(variant, n_keywords, upstream_type)
    for key, tensor in state.items():
        collector.add(key, tensor, state)
    return collector.finish()

"""Translate a reference SpeechCLIP / SpeechCLIP+ config (``avssl`` YAML / ``OrderedNamespace``) into ours.

Reference layout (config/speechCLIP/**/spchclp_*.yaml in atosystem/SpeechCLIP, config/speechCLIP+/**/*.yaml
in ShampooWang/SpeechCLIP_plus): ``model_settings`` (objective weights, ``parallel_branch``,
``cascaded_branch``), ``cl_loss``, ``retrieval``, ``clip``, ``audio_encoder`` (upstream, optimiser,
schedule), ``data``, ``trainer``.

Variant: ``cascaded_objective_weight > 0`` selects the branch by ``cascaded_branch.type`` with ``KW_``
removed and ``dynamic`` read as ``plus`` (the reference's own normalisation): ``CascadedBranch`` -> c,
``CascadedBranch_plus`` -> cplus, ``HybridBranch`` -> h, ``HybridBranch_plus`` -> hplus; otherwise
``parallel_objective_weight > 0`` -> p.

Settings the reference reads are translated one to one (``translate`` returns the mapping it applied);
settings it never reads are reported as notes (e.g. ``conv_cif_dropout``: the CIF dropout is
``nn.Dropout()``'s default 0.5). A setting this toolkit cannot reproduce (another quantiser, a fine-tuned
upstream, a CIF output projection, ...) is an error naming the key.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

BRANCH_TYPES = {"CascadedBranch": "c", "CascadedBranch_plus": "cplus", "HybridBranch": "h",
                "HybridBranch_plus": "hplus"}
ATTENTION_TYPES = {"TransformerEncoder": "transformer", "MultiheadAttentionAndNorm": "mha"}
HUBERT_NAMES = {"hubert": "hubert_base", "hubert_base": "hubert_base", "hubert_large_ll60k": "hubert_large_ll60k"}
OPTIMIZERS = {"Adam": "adam", "AdamW": "adamw"}
FRAMES_PER_KEYWORD = 20  # the reference's duration target: round(HuBERT frames / 20)
NEVER_STOP_SCALING = 2**31 - 1
_MISSING = object()


class ReferenceConfigError(ValueError):
    """A reference config key that is missing, malformed or not reproducible here (message names it)."""


class RefConfig:
    """Dotted read access to a nested reference config; errors name the key and the source."""

    def __init__(self, data: Dict[str, Any], source: str):
        self.data, self.source = data, source

    def get(self, key: str, default: Any = _MISSING) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is _MISSING:
                    raise ReferenceConfigError(f"{self.source}: reference config key '{key}' is missing")
                return default
            node = node[part]
        return node

    def has(self, key: str) -> bool:
        return self.get(key, None) is not None

    def fail(self, key: str, problem: str) -> ReferenceConfigError:
        return ReferenceConfigError(f"{self.source}: reference config key '{key}': {problem}")

    def require(self, key: str, allowed: Tuple, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if value not in allowed:
            raise self.fail(key, f"{value!r} is not supported here (supported: {', '.join(map(repr, allowed))})")
        return value

    def number(self, key: str, default: Any = _MISSING) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number, got {value!r}")
        return value


def detect_variant(r: RefConfig) -> str:
    """Our variant name for a reference config (module docstring)."""
    if r.number("model_settings.cascaded_objective_weight", 0.0) > 0:
        raw = str(r.get("model_settings.cascaded_branch.type"))
        kind = raw.replace("KW_", "").replace("dynamic", "plus")
        if kind not in BRANCH_TYPES:
            raise r.fail("model_settings.cascaded_branch.type",
                         f"{raw!r} is not one of the released branches ({', '.join(BRANCH_TYPES)})")
        return BRANCH_TYPES[kind]
    if r.number("model_settings.parallel_objective_weight", 0.0) > 0:
        return "p"
    raise r.fail("model_settings", "both cascaded_objective_weight and parallel_objective_weight are 0")


def _attention(r: RefConfig, branch: str, notes: List[str]) -> Dict[str, Any]:
    args = f"model_settings.{branch}.transformer_args"
    kind = r.get(f"{args}.type", None) or r.get(f"model_settings.{branch}.transformer_type")
    if kind not in ATTENTION_TYPES:
        raise r.fail(f"{args}.type", f"attention block {kind!r} is not supported ({', '.join(ATTENTION_TYPES)})")
    enc = {"type": ATTENTION_TYPES[kind], "n_heads": int(r.number(f"{args}.nhead")),
           "dropout": float(r.number(f"{args}.dropout", 0.1)), "attention_dropout": None}
    if not math.isclose(r.number(f"{args}.layer_norm_eps", 1e-5), 1e-5):
        raise r.fail(f"{args}.layer_norm_eps", "only 1e-5 (PyTorch's default) is supported")
    if enc["type"] == "transformer":
        enc["n_layers"] = int(r.number(f"{args}.n_layers", 1))
        enc["ffn_dim"] = int(r.number(f"{args}.dim_feedforward", 2048))
        r.require(f"{args}.activation", ("gelu",), "gelu")
        r.require(f"{args}.norm_first", (False,), False)
    else:
        notes.append(f"{args}: MultiheadAttentionAndNorm has no feed-forward part; n_layers and "
                     "dim_feedforward are not read by the reference")
    return enc


def _projection(r: RefConfig, key: str) -> List[int]:
    """Hidden sizes of a reference ``MLPLayers`` (``dimensions`` [in, hidden..., out]); [] for a Linear."""
    dims = r.get(f"{key}.dimensions", None)
    if dims is None:
        return []
    if not isinstance(dims, list) or len(dims) < 2 or not all(isinstance(d, int) for d in dims):
        raise r.fail(f"{key}.dimensions", f"expected a list of at least two sizes, got {dims!r}")
    return list(dims[1:-1])


def _vq_temperature(r: RefConfig) -> float:
    base = "model_settings.cascaded_branch.vq"
    r.require(f"{base}.type", ("SimpleVectorQuantizer",))
    r.require(f"{base}.args.use_gumbel", (False,), False)
    r.require(f"{base}.args.hard", (True,), True)
    temp = r.get(f"{base}.args.temp")
    if isinstance(temp, str) and temp.startswith("fixed="):
        try:
            return float(temp[len("fixed="):])
        except ValueError:
            pass
    raise r.fail(f"{base}.args.temp", f"{temp!r}: only a fixed temperature ('fixed=<value>') is supported")


def _keywords(r: RefConfig, variant: str) -> Dict[str, Any]:
    base = "model_settings.cascaded_branch.keyword"
    out: Dict[str, Any] = {"weight": float(r.number("model_settings.cascaded_objective_weight")),
                           "projection": _projection(r, f"{base}.kw_projection"),
                           "vq_temperature": _vq_temperature(r)}
    if variant in ("c", "h"):
        out["n_keywords"] = int(r.number(f"{base}.number", 8))
    if not r.has(f"{base}.batchnorms"):
        raise r.fail(f"{base}.batchnorms", "missing: keywords without BatchNorm are not supported")
    scale = r.get(f"{base}.batchnorms.std_scale", 1.0)
    scales = scale if isinstance(scale, list) else [scale]
    if not scales or len(set(scales)) != 1 or not isinstance(scales[0], (int, float)):
        raise r.fail(f"{base}.batchnorms.std_scale", f"expected one number, got {scale!r}")
    out["bn_std_scale"] = float(scales[0])
    return out


def _cif(r: RefConfig, notes: List[str]) -> Dict[str, Any]:
    base = "model_settings.cascaded_branch.downsampling"
    r.require(f"{base}.type", ("cif",))
    c = f"{base}.cif"
    r.require(f"{c}.produce_weight_type", ("conv",), "conv")
    if r.get(f"{c}.cif_output_dim", 768) != r.get(f"{c}.encoder_embed_dim", 768):
        raise r.fail(f"{c}.cif_output_dim", "differs from encoder_embed_dim: the reference then adds an output "
                                            "projection after CIF, which is not supported here")
    r.require(f"{c}.apply_tail_handling", (True,), True)
    out = {"threshold": float(r.number(f"{c}.cif_threshold", 1.0)),
           "conv_width": int(r.number(f"{c}.conv_cif_width", 3)),
           "conv_layers": int(r.number(f"{c}.num_layer", 1)),
           "dropout": 0.5,
           "tail_threshold": float(r.number(f"{c}.tail_handling_firing_threshold", 0.5)),
           "max_keywords": 75,
           "quantity_weight": float(r.number(f"{c}.quantity_loss_weight", 1.0)),
           "target": "duration",
           "seconds_per_keyword": 0.4}
    step = int(r.number(f"{c}.scaling_step", -1))
    out["scaling_steps"] = 0 if not r.get(f"{c}.apply_scaling", True) else (NEVER_STOP_SCALING if step < 0 else step)
    if r.get(f"{base}.using_gt_len", False):
        out["target"] = "clip_bpe"
    notes.append(f"{c}: the CIF dropout is nn.Dropout()'s default 0.5 (conv_cif_dropout="
                 f"{r.get(f'{c}.conv_cif_dropout', None)!r} and conv_cif_layer_num are never read)")
    if r.get(f"{c}.using_gt_len", None) is not None:
        notes.append(f"{c}.using_gt_len is never read (the reference reads {base}.using_gt_len): "
                     f"target = {out['target']}")
    return out


def _upstream(r: RefConfig) -> Dict[str, Any]:
    kind = r.require("audio_encoder.type", ("FairseqHubert", "s3prl_plus"))
    name = str(r.get("audio_encoder.name"))
    if kind == "FairseqHubert":
        if name not in HUBERT_NAMES:
            raise r.fail("audio_encoder.name", f"{name!r} is not a FairseqHubert model ({', '.join(HUBERT_NAMES)})")
        name = HUBERT_NAMES[name]
    r.require("audio_encoder.feat_select_idx", ("weighted_sum",))
    r.require("audio_encoder.trainable", (False,), False)
    for key in ("reinit_layers", "unfreeze_layers"):
        if r.get(f"audio_encoder.{key}", []):
            raise r.fail(f"audio_encoder.{key}", "a partly trained upstream is not supported")
    r.require("audio_encoder.normalize_type", ("s3prl",), "s3prl")
    return {"name": name, "ckpt": None, "model_config": None,
            "normalize_waveform": bool(r.get("data.dataset.normalize_waveform", False)),
            "normalize_hiddenstates": bool(r.get("audio_encoder.normalize_hiddenstates", False))}


def _train(r: RefConfig, notes: List[str]) -> Dict[str, Any]:
    """The training hyper-parameters that have a counterpart here (absent keys keep our defaults)."""
    pairs = {"seed": "seed", "batch_size": "data.batch_size", "valid_batch_size": "data.dev_batch_size",
             "accum_grad": "trainer.accumulate_grad_batches", "max_steps": "trainer.max_steps",
             "lr": "audio_encoder.optim.args.lr", "weight_decay": "audio_encoder.optim.args.weight_decay",
             "warmup_steps": "audio_encoder.scheduler.warmup", "final_lr": "audio_encoder.scheduler.final_lr",
             "grad_clip": "trainer.gradient_clip_val"}
    floats = {"lr", "weight_decay", "final_lr", "grad_clip"}
    out: Dict[str, Any] = {}
    for ours, theirs in pairs.items():
        if r.has(theirs):
            value = r.number(theirs)
            out[ours] = float(value) if ours in floats else int(value)
    optimizer = r.get("audio_encoder.optim.name", None)
    if optimizer in OPTIMIZERS:
        out["optimizer"] = OPTIMIZERS[optimizer]
    elif optimizer is not None:
        notes.append(f"audio_encoder.optim.name={optimizer!r} has no counterpart; train.optimizer keeps its default")
    return out


def translate(data: Dict[str, Any], source: str) -> Tuple[Dict[str, Any], str, List[str]]:
    """Reference config -> (config data for ``speechclip_plus.config.load_config(data=...)``, variant, notes).

    The ``model`` section is complete (variant, upstream, CLIP, attention block, branches, CIF, loss,
    crop length, retrieval branch); ``train`` carries the reference's optimiser and schedule where set.
    ``model.clip.vocab`` is left null: the reduced vocabulary travels in the model file (``vocab_ids``).
    """
    r = RefConfig(data, source)
    notes: List[str] = []
    variant = detect_variant(r)
    clip_name = str(r.get("clip.name"))
    r.require("clip.image_encoder_trainable", (False,), False)
    r.require("clip.text_encoder_trainable", (False,), False)
    branch = "parallel_branch" if variant == "p" else "cascaded_branch"
    model: Dict[str, Any] = {
        "variant": variant,
        "upstream": _upstream(r),
        "clip": {"name": clip_name.replace("/", "-"), "pretrained": "openai", "vocab": None, "quick_gelu": None},
        "encoder": _attention(r, branch, notes),
    }
    if variant in ("p", "h", "hplus"):
        model["parallel"] = {"weight": float(r.number("model_settings.parallel_objective_weight"))}
        if variant in ("p", "h") and not r.get("model_settings.parallel_branch.need_projection", True):
            raise r.fail("model_settings.parallel_branch.need_projection", "false is not supported")
        if variant == "h":
            model["parallel"]["projection"] = _projection(r, "model_settings.parallel_branch.projection_config")
            d_par = r.get("model_settings.parallel_branch.transformer_args.d_model", None)
            d_cas = r.get("model_settings.cascaded_branch.transformer_args.d_model", None)
            if d_par is not None and d_cas is not None and d_par != d_cas:
                raise r.fail("model_settings.parallel_branch.transformer_args.d_model",
                             f"{d_par} differs from the cascaded branch's {d_cas} (one shared attention block)")
        if variant == "hplus" and r.has("model_settings.parallel_branch.projection_config"):
            notes.append("model_settings.parallel_branch.projection_config is ignored by the reference's "
                         "HybridBranch_plus (a single Linear): imported as one Linear")
    if variant != "p":
        model["cascaded"] = _keywords(r, variant)
    if variant in ("cplus", "hplus"):
        model["cif"] = _cif(r, notes)
    elif r.has("model_settings.cascaded_branch.downsampling") and variant != "p":
        notes.append("model_settings.cascaded_branch.downsampling is not used by the reference's "
                     f"{r.get('model_settings.cascaded_branch.type')} (no CIF, no quantity loss)")
    r.require("cl_loss.type", ("MaskedContrastiveLoss",))
    for key, ok in (("margin", (0, 0.0)), ("dcl", (False,)), ("a2b", (True,)), ("b2a", (True,))):
        r.require(f"cl_loss.args.{key}", ok, ok[0])
    model["loss"] = {"temperature": float(r.number("cl_loss.args.temperature", 0.07)),
                     "learnable_temperature": bool(r.get("cl_loss.args.temperature_trainable", False))}
    crop = r.get("audio_encoder.max_audio_len", -1)
    model["max_audio_len"] = int(crop) if isinstance(crop, int) and crop > 0 else None
    src = r.get("retrieval.audio_feat_src", None)
    if src is not None:
        has = {"parallel": variant in ("p", "h", "hplus"), "cascaded": variant != "p"}
        if src not in has or not has[src]:
            raise r.fail("retrieval.audio_feat_src", f"{src!r} is not a branch of variant {variant}")
        model["retrieval_branch"] = src
    return {"model": model, "train": _train(r, notes)}, variant, notes

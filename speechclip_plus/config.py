"""Configuration: YAML files over built-in defaults, with typed dotted command-line overrides.

Contract
- ``DEFAULTS`` is the full schema: every valid key and its default. A key's type is its default's type
  (an int default also accepts nothing but ints; a float default accepts ints; ``None`` defaults accept
  any scalar, a list or null).
- ``load_config(path, overrides)`` = defaults <- YAML file <- overrides. Overrides are argv-style pairs
  ``--model.cif.threshold 0.9`` (values parsed as YAML, so ``[256, 512]``, ``null``, ``true`` work).
- Inheritance: a YAML file may name a ``base:`` config (a path relative to the file, ending in ``.yaml``, or the
  name of a packaged config such as ``base_hplus`` = ``speechclip_plus/conf/base_hplus.yaml``), which may name its
  own. The resolved config is defaults <- the root base <- ... <- the file: a key of a file replaces the same key
  of its bases (section by section, so ``model: {cif: {threshold: 0.9}}`` changes that one key; a list is
  replaced whole). ``base`` itself is not part of the resolved config. A missing base or a cycle is a
  ``ConfigError`` naming the files.
- Unknown keys and wrong types raise ``ConfigError`` with one line naming the key (and the file), listing
  the valid keys at that level.
- Keys in ``PATH_KEYS`` holding a relative path are resolved against the directory of the YAML file
  that set them, a base included (overrides: against the current directory).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import yaml

VARIANTS = ("p", "c", "cplus", "h", "hplus")

DEFAULTS: Dict[str, Any] = {
    "model": {
        "variant": "hplus",  # p | c | cplus | h | hplus
        "upstream": {
            "name": "hubert_base",  # s3prl hub entry (hubert_base, hubert_large_ll60k, wavlm_base_plus, fbank, ...)
            "ckpt": None,  # local checkpoint for s3prl *_local / *_custom entries
            "model_config": None,  # s3prl upstream config file (e.g. features for baseline_local)
            "normalize_waveform": False,  # layer-norm each waveform first (S+ base configs)
            "normalize_hiddenstates": False,  # affine-free layer-norm of each state before the weighted sum
            "per_utterance": False,  # run the upstream one utterance at a time (batch-independent, slower)
            "raw_last_layer": False,  # last state = raw output of the last layer (the reference), not s3prl's
            #                           (after the final LayerNorm of pre-LN models such as HuBERT Large)
        },
        "clip": {
            "name": "ViT-B-32",  # open_clip architecture, or a path to an open_clip model-config .json
            "pretrained": "openai",  # open_clip pretrained tag, a local checkpoint path, or null (random)
            "vocab": None,  # usage-by-frequency file of the reduced keyword vocabulary; null = all tokens
            "quick_gelu": None,  # QuickGELU towers; null = what the pretrained tag was trained with (openai: true)
        },
        "encoder": {  # trainable attention block on the weighted sum, shared by the branches
            "type": "mha",  # mha: attention + residual + LayerNorm (no FFN) | transformer: post-LN layers + final LN
            "n_layers": 1,  # transformer only
            "n_heads": 8,
            "ffn_dim": 3072,  # transformer only
            "dropout": 0.1,
            "attention_dropout": None,  # dropout on the attention weights; null = dropout (0 allows fused kernels)
            "conv_pos": 0,  # width of a convolutional positional embedding on the frames (HuBERT-style); 0 = none
            "conv_pos_groups": 16,  # its channel groups
        },
        "parallel": {
            "weight": 1.0,  # loss weight w_p (p, h, hplus)
            "projection": [],  # hidden sizes of the MLP to CLIP space; [] = one Linear
        },
        "cascaded": {
            "weight": 1.0,  # loss weight w_c (c, cplus, h, hplus)
            "n_keywords": 8,  # fixed CLS keywords (c, h)
            "projection": [],  # hidden sizes of the keyword MLP to CLIP token space; [] = one Linear
            "bn_std_scale": 1.0,  # keyword BatchNorm initial scale = token-table std * this
            "vq_temperature": 0.1,  # softmax temperature of the straight-through quantiser
        },
        "cif": {  # cplus, hplus
            "threshold": 1.0,  # beta
            "max_keywords": 75,  # SOT + 75 + EOT fill CLIP's 77-token context
            "conv_width": 3,
            "conv_layers": 1,
            "dropout": 0.5,  # the reference's effective value (nn.Dropout default)
            "scaling_steps": 5000,  # scale weights to the target length while global step < this
            "tail_threshold": 0.5,
            "target": "duration",  # duration | clip_bpe | spm
            "seconds_per_keyword": 0.4,  # duration target: round(seconds / this)
            "quantity_weight": 0.25,  # w_q of L_QUA
        },
        "loss": {
            "temperature": 0.07,  # initial softmax temperature of the contrastive loss
            "learnable_temperature": True,
            "max_logit_scale": 100.0,  # clamp of exp(t) (the reference has none)
            "per_branch_temperature": False,  # hybrids: one temperature per branch (the reference shares one)
        },
        "max_audio_len": 102400,  # training-time random crop in samples (6.4 s); null = no crop
        "retrieval_branch": None,  # branch that selects checkpoints and is reported: parallel | cascaded;
        #                            null = the variant's first (parallel for p/h/hplus, cascaded for c/cplus)
    },
    "train": {
        "seed": 7122,
        "batch_size": 256,
        "bucketing": False,  # length-bucketed batches; false = a uniform shuffle (the reference)
        "max_batch_seconds": None,  # cap on audio seconds per batch
        "valid_batch_size": 8,
        "accum_grad": 1,
        "max_steps": 50000,
        "optimizer": "adam",  # adam | adamw
        "lr": 1.0e-4,
        "weight_decay": 1.0e-6,
        "warmup_steps": 5000,
        "final_lr": 1.0e-8,
        "grad_clip": 4.0,
        "precision": "auto",  # auto | bf16 | fp16 | fp32 (auto: bf16 where native, fp16 + scaler on older GPUs)
        "valid_every": "epoch",  # validate at the end of every epoch (the reference) or every N optimiser steps
        "log_every": 50,
        "keep_checkpoints": 3,
        "select_metric": "recall_mean_10",
        "num_workers": 2,
        "max_bad_steps": 20,  # consecutive skipped steps (non-finite loss or fp16 overflow) before stopping
        "log_grad_norms": False,  # log each loss term's gradient norm at the shared encoder (every log_every)
        "save_frozen": None,  # frozen weights in checkpoints: null = only if not from pretrained files; true | false
        "train_data": None,  # Kaldi data dir (set by bin/train --train_data)
        "valid_data": None,  # Kaldi data dir (--valid_data); null = no validation
        "image_embeds": None,  # stage-2 image-embedding scp covering the training images (--image_embeds)
        "valid_image_embeds": None,  # scp for the validation images; null = image_embeds (--valid_image_embeds)
    },
    "data": {
        "sample_rate": 16000,
        "text_vocab": None,  # sentencepiece model for the spm CIF target
    },
}

# Keys that also accept a type other than their default's.
ALSO_ACCEPTS = {"train.valid_every": int}

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# Keys whose values are file paths (resolved relative to the YAML that sets them).
PATH_KEYS = {
    "model.upstream.ckpt",
    "model.upstream.model_config",
    "model.clip.vocab",
    "model.clip.name",
    "model.clip.pretrained",
    "data.text_vocab",
}


BASE_KEY = "base"  # the top-level key naming the config a file inherits from
PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


class ConfigError(ValueError):
    """A bad configuration key, value or file."""


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    return isinstance(value, type(default))


def _looks_like_path(key: str, value: Any) -> bool:
    if key not in PATH_KEYS or not isinstance(value, str) or os.path.isabs(value):
        return False
    if key == "model.clip.name":
        return value.endswith(".json")
    if key == "model.clip.pretrained":
        return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))
    return True


def _set(cfg: Dict, schema: Dict, key: str, value: Any, source: str, base_dir: Optional[str]) -> None:
    parts = key.split(".")
    node, spec = cfg, schema
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "<top level>"
        if not isinstance(spec, dict) or part not in spec:
            valid = ", ".join(sorted(spec)) if isinstance(spec, dict) else "(none: not a section)"
            raise ConfigError(f"{source}: unknown key '{key}'; valid keys under {where}: {valid}")
        if i == len(parts) - 1:
            default = spec[part]
            if isinstance(default, dict):
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: '{key}' is a section, got {type(value).__name__}")
                for sub, subval in value.items():
                    _set(cfg, schema, f"{key}.{sub}", subval, source, base_dir)
                return
            other = ALSO_ACCEPTS.get(key)
            if not (_type_ok(default, value) or (other is not None and _type_ok(other(), value))):
                expected = type(default).__name__ + (f" or {other.__name__}" if other else "")
                raise ConfigError(
                    f"{source}: '{key}' must be {expected}, got {type(value).__name__} {value!r}"
                )
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            if base_dir is not None and _looks_like_path(key, value):
                value = os.path.normpath(os.path.join(base_dir, value))
            node[part] = value
            return
        node, spec = node[part], spec[part]


def read_yaml(path: str) -> Dict:
    """Read a YAML mapping with ``safe_load``; errors name the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _base_path(ref: Any, named_by: str) -> str:
    """The file a ``base:`` value names: a path (relative to ``named_by``'s directory) or a packaged name."""
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"{named_by}: '{BASE_KEY}' must be a config file or a packaged config name, got {ref!r}")
    if ref.endswith((".yaml", ".yml")) or "/" in ref or os.sep in ref:
        path = os.path.join(os.path.dirname(os.path.abspath(named_by)), os.path.expanduser(ref))
    else:
        path = os.path.join(PACKAGED_CONFIGS, f"{ref}.yaml")
    path = os.path.normpath(path)
    if not os.path.isfile(path):
        packaged = sorted(n[:-5] for n in os.listdir(PACKAGED_CONFIGS) if n.endswith(".yaml"))
        raise ConfigError(f"{named_by}: base config '{ref}' not found ({path}); a base is a .yaml path relative to "
                          f"this file or a packaged config name: {', '.join(packaged)}")
    return path


def read_config_files(path: str) -> List[Tuple[str, Dict]]:
    """``[(file, mapping without 'base')]`` of ``path`` and its chain of bases, the root base first.

    ``path`` keeps the spelling it was given (for messages); bases are normalised absolute paths.
    """
    chain: List[Tuple[str, Dict]] = []
    seen: Dict[str, str] = {}
    current = path
    while True:
        real = os.path.realpath(current)
        if real in seen:
            cycle = " -> ".join([f for f, _ in chain] + [current])
            raise ConfigError(f"{path}: the base configs form a cycle: {cycle}")
        seen[real] = current
        data = dict(read_yaml(current))
        ref = data.pop(BASE_KEY, None)
        chain.append((current, data))
        if ref is None:
            return chain[::-1]
        current = _base_path(ref, current)


def parse_overrides(args: Iterable[str]) -> List[tuple]:
    """``['--a.b', '1', '--c.d=x']`` -> ``[('a.b', 1), ('c.d', 'x')]`` (values parsed as YAML)."""
    args = list(args)
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override '{arg}': expected --section.key value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{arg}' has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key, value))
    return pairs


def merge(cfg: Dict, data: Dict, source: str, base_dir: Optional[str] = None) -> Dict:
    """Return ``cfg`` updated from the nested mapping ``data`` (validated against ``DEFAULTS``)."""
    cfg = copy.deepcopy(cfg)
    for key, value in data.items():
        _set(cfg, DEFAULTS, str(key), value, source, base_dir)
    return cfg


def check(cfg: Dict) -> Dict:
    """Cross-key checks; returns ``cfg``."""
    m = cfg["model"]
    if m["variant"] not in VARIANTS:
        raise ConfigError(f"model.variant: '{m['variant']}' is not one of {', '.join(VARIANTS)}")
    if m["encoder"]["type"] not in ("mha", "transformer"):
        raise ConfigError(f"model.encoder.type: '{m['encoder']['type']}' is not one of mha, transformer")
    enc = m["encoder"]
    ad = enc["attention_dropout"]
    if ad is not None and (isinstance(ad, bool) or not isinstance(ad, (int, float)) or not 0 <= ad < 1):
        raise ConfigError(f"model.encoder.attention_dropout: {ad!r} is not null or a number in [0, 1)")
    if enc["conv_pos"] < 0 or (enc["conv_pos"] and enc["conv_pos"] % 2 == 0):
        raise ConfigError(f"model.encoder.conv_pos: {enc['conv_pos']} is not 0 (none) or an odd width")
    if m["cif"]["target"] not in ("duration", "clip_bpe", "spm"):
        raise ConfigError(f"model.cif.target: '{m['cif']['target']}' is not one of duration, clip_bpe, spm")
    if m["retrieval_branch"] not in (None, "parallel", "cascaded"):
        raise ConfigError("model.retrieval_branch: must be parallel, cascaded or null")
    if m["variant"] in ("p", "h", "hplus") and m["parallel"]["weight"] <= 0:
        raise ConfigError(f"model.parallel.weight must be > 0 for variant {m['variant']}")
    if m["variant"] in ("c", "cplus", "h", "hplus") and m["cascaded"]["weight"] <= 0:
        raise ConfigError(f"model.cascaded.weight must be > 0 for variant {m['variant']}")
    t = cfg["train"]
    if t["optimizer"] not in ("adam", "adamw"):
        raise ConfigError("train.optimizer: must be adam or adamw")
    if t["precision"] not in PRECISIONS:
        raise ConfigError(f"train.precision: '{t['precision']}' is not one of {', '.join(PRECISIONS)}")
    ve = t["valid_every"]
    if ve != "epoch" and not (isinstance(ve, int) and ve >= 1):
        raise ConfigError(f"train.valid_every: {ve!r} is not 'epoch' or a number of steps >= 1")
    return cfg


def load_config(path: Optional[str] = None, overrides: Iterable[str] = (), data: Optional[Dict] = None) -> Dict:
    """Resolved config = DEFAULTS <- YAML ``path`` (after its ``base:`` chain) <- ``data`` <- argv-style
    ``overrides``."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        for file, file_data in read_config_files(path):
            cfg = merge(cfg, file_data, file, os.path.dirname(os.path.abspath(file)))
    if data:
        cfg = merge(cfg, data, "<dict>")
    for key, value in parse_overrides(overrides):
        cfg = merge(cfg, {key: value}, "command line", os.getcwd())
    return check(cfg)


def model_config(cfg: Dict) -> Dict:
    """The ``model`` section with defaults filled (accepts a full config or just its model part)."""
    if "model" not in cfg:
        cfg = {"model": cfg}
    return check(merge(copy.deepcopy(DEFAULTS), {"model": cfg["model"]}, "<model config>"))["model"]


def dump_config(cfg: Dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def save_config(cfg: Dict, path: str) -> None:
    """Write the resolved config atomically (temp name, then rename; no temp file is left on failure)."""
    from .io import atomic_write_text

    atomic_write_text(path, dump_config(cfg))

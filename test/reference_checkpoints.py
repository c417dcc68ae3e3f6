"""Tiny checkpoints laid out like the official SpeechCLIP / SpeechCLIP+ releases, for the importer tests.

What a released file looks like (described from the public reference code, not copied from it):
- a PyTorch Lightning checkpoint dict: ``epoch``, ``global_step``, ``pytorch-lightning_version``,
  ``state_dict``, ``optimizer_states``, ``lr_schedulers``, ``callbacks``, ``hparams_name`` and
  ``hyper_parameters = {"config": <OrderedNamespace>}``;
- the namespace is ``avssl.base.ordered_namespace.OrderedNamespace``, pickled as "new object + state", the
  state being the ordered mapping of its keys; nested sections are namespaces too;
- ``config.trainer.logger`` holds the pickled ``pytorch_lightning.loggers.wandb.WandbLogger``, whose state
  is a dict of plain values plus the aggregation function ``numpy.mean``;
- state-dict names as in ``weights.py``'s table (HuBERT under ``audio_encoder.encoder.``, CLIP under
  ``clip.model.`` with a reduced token table, again under ``cascaded_branch.clip.``, ...).

Stand-in classes with those module paths are registered in ``sys.modules`` only while ``torch.save`` runs,
so the pickle names exactly the globals a real file names. Sizes: the tiny s3prl HuBERT (32-d, 3 states)
and the tiny open_clip CLIP (token width 64, joint embedding 48).
"""
from __future__ import annotations

import collections
import sys
import types
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import nn

D_MODEL, TOKEN_DIM, EMBED_DIM, N_STATES = 32, 64, 48, 3
N_KEYWORDS = 4
# A reduced vocabulary ordered like the reference's byfreq files: "!" (pad), a frequent word, SOT, EOT, ...
VOCAB = [0, 320, 49406, 49407] + list(range(530, 560)) + list(range(1000, 1030))


class OrderedNamespace:
    """Stand-in with the reference namespace's module path; its pickled state is its ordered mapping."""

    def __init__(self, mapping: Dict[str, Any]):
        self._odict = collections.OrderedDict(mapping)

    def __getstate__(self):
        return self._odict


class WandbLogger:
    """Stand-in for Lightning's wandb logger: plain attributes plus the numpy aggregation function."""

    def __init__(self, project: str, name: str):
        self._wandb_init = {"project": project, "name": name, "resume": "allow"}
        self._experiment, self._id = None, "run42"
        self._agg_default_func = np.mean
        self._metrics_to_agg, self._prev_step = [], -1


OrderedNamespace.__module__ = "avssl.base.ordered_namespace"
WandbLogger.__module__ = "pytorch_lightning.loggers.wandb"


@contextmanager
def reference_modules() -> Iterator[None]:
    """Make the stand-ins importable under the reference's module paths (for pickling only)."""
    modules = {"avssl": None, "avssl.base": None, "avssl.base.ordered_namespace": OrderedNamespace,
               "pytorch_lightning": None, "pytorch_lightning.loggers": None,
               "pytorch_lightning.loggers.wandb": WandbLogger}
    saved = {name: sys.modules.get(name) for name in modules}
    try:
        for name, cls in modules.items():
            mod = types.ModuleType(name)
            if cls is not None:
                setattr(mod, cls.__name__, cls)
            sys.modules[name] = mod
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def as_namespace(value: Any) -> Any:
    """Nested dicts -> nested ``OrderedNamespace`` stand-ins (lists keep their items)."""
    if isinstance(value, dict):
        return OrderedNamespace({k: as_namespace(v) for k, v in value.items()})
    if isinstance(value, list):
        return [as_namespace(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- configs
def _attention_args(kind: str, heads: int, in_args: bool) -> Dict[str, Any]:
    args = {"n_layers": 1, "d_model": D_MODEL, "nhead": heads, "dim_feedforward": 64, "dropout": 0.1,
            "activation": "gelu", "layer_norm_eps": 1.0e-5, "batch_first": True, "norm_first": False}
    if in_args:  # SpeechCLIP+ style: the block type inside transformer_args
        args = {"type": kind, **args}
    return args


# Per variant: branch type, attention block and heads, keyword / parallel projections, CIF shape, retrieval.
LAYOUTS = {
    "p": {"attention": "TransformerEncoder", "heads": 4, "retrieval": "parallel", "temp_trainable": False},
    "c": {"type": "KW_CascadedBranch", "attention": "MultiheadAttentionAndNorm", "heads": 1,
          "kw_mlp": [D_MODEL, 40, TOKEN_DIM], "retrieval": "cascaded", "temp_trainable": True},
    "cplus": {"type": "CascadedBranch_dynamic", "attention": "MultiheadAttentionAndNorm", "heads": 2,
              "cif_layers": 2, "cif_width": 5, "retrieval": "cascaded", "temp_trainable": True},
    "h": {"type": "HybridBranch", "attention": "TransformerEncoder", "heads": 1,
          "p_mlp": [D_MODEL, 40, EMBED_DIM], "retrieval": "cascaded", "temp_trainable": False},
    "hplus": {"type": "HybridBranch_dynamic", "attention": "MultiheadAttentionAndNorm", "heads": 2,
              "cif_layers": 1, "cif_width": 3, "retrieval": "parallel", "temp_trainable": True},
}


def reference_config(variant: str) -> Dict[str, Any]:
    """A reference-style config dict (sections and keys as in the authors' YAML files) at tiny size."""
    lay = LAYOUTS[variant]
    sc_style = variant in ("p", "c")  # SpeechCLIP configs name the block in <branch>.transformer_type
    parallel = {"transformer_args": _attention_args("TransformerEncoder", 4, not sc_style), "need_projection": True}
    if sc_style:
        parallel["transformer_type"] = "TransformerEncoder"
    if "p_mlp" in lay:
        parallel["projection_config"] = {"dimensions": lay["p_mlp"], "dropout": 0.1}
    cascaded: Dict[str, Any] = {
        "type": lay.get("type", "KW_CascadedBranch"),
        "transformer_args": _attention_args(lay["attention"], lay["heads"], not sc_style),
        "keyword": {"number": N_KEYWORDS, "detokenized_K_neighbors": 5, "retrieve_method": "cosine",
                    "batchnorms": {"type": "eachKw", "std_scale": 1.0, "learnable": True, "parallel": True}},
        "vq": {"activation": "gelu", "type": "SimpleVectorQuantizer",
               "args": {"temp": "fixed=0.1", "time_first": True, "use_gumbel": False, "hard": True}},
    }
    if sc_style:
        cascaded["transformer_type"] = lay["attention"] if variant == "c" else "MultiheadAttentionAndNorm"
    if variant == "p":
        parallel["transformer_args"] = _attention_args(lay["attention"], lay["heads"], False)
    if "kw_mlp" in lay:
        cascaded["keyword"]["kw_projection"] = {"dimensions": lay["kw_mlp"], "dropout": 0.1}
    if variant in ("cplus", "hplus", "h"):
        cascaded["downsampling"] = {"type": "cif", "cif": {
            "quantity_loss_weight": 0.25 if variant != "h" else 0.025, "using_gt_len": False,
            "cif_output_dim": D_MODEL, "encoder_embed_dim": D_MODEL, "produce_weight_type": "conv",
            "cif_threshold": 1.0, "num_layer": lay.get("cif_layers", 1), "conv_cif_layer_num": 1,
            "conv_cif_width": lay.get("cif_width", 3), "conv_cif_dropout": 0.1, "apply_scaling": True,
            "scaling_step": 5000, "apply_tail_handling": True, "tail_handling_firing_threshold": 0.5}}
    weights = {"p": (0.0, 1.0), "c": (1.0, 0.0), "cplus": (1.0, 0.0), "h": (1.0, 1.0), "hplus": (1.5, 0.5)}[variant]
    return {
        "seed": 7122, "train": True, "njobs": 4,
        "data": {"dataset": {"name": "flickr", "dataset_root": "/data/flickr", "text_file": "Flickr8k.token.txt",
                             "clip_image_transform": "ViT-B/32", "normalize_waveform": variant in ("cplus", "hplus")},
                 "batch_size": 128, "dev_batch_size": 6, "split_ratio": 0.9},
        "model_settings": {"cascaded_objective_weight": weights[0], "parallel_objective_weight": weights[1],
                           "keyword_objective_weight": 0.0, "parallel_branch": parallel, "cascaded_branch": cascaded},
        "cl_loss": {"type": "MaskedContrastiveLoss",
                    "args": {"temperature": 0.07, "temperature_trainable": lay["temp_trainable"], "margin": 0.0,
                             "dcl": False, "a2b": True, "b2a": True}},
        "retrieval": {"audio_feat_src": lay["retrieval"], "recall_at": [1, 5, 10]},
        "clip": {"name": "ViT-B/32", "image_encoder_trainable": False, "text_encoder_trainable": False,
                 "reduce_subword_embbedding": "./avssl/data/flickr_stat/text_clip_vocab_usage_byfreq.npy"},
        "audio_encoder": {"type": "FairseqHubert", "name": "hubert", "pretrained": True, "trainable": False,
                          "feat_select_idx": "weighted_sum", "layer_drop": 0.0, "max_audio_len": 102400,
                          "normalize_hiddenstates": variant == "h",
                          "optim": {"name": "Adam", "args": {"lr": 1.0e-4, "weight_decay": 1.0e-6}},
                          "scheduler": {"name": "linear_warmup_decay", "warmup": 5000, "max_step": 50000,
                                        "final_lr": 1.0e-8}},
        "trainer": {"max_steps": 50000, "gradient_clip_val": 4, "accumulate_grad_batches": 2, "precision": 16,
                    "logger": "wandb", "default_root_dir": f"exp/{variant}", "strategy": "dp"},
        "log_setting": {"log_detokenize_results": True, "log_detokenize_results_every_n_epoch": 5},
        "logger": {"project": "kw-general"},
    }


# ---------------------------------------------------------------------------------------------- weights
def _rand(g: torch.Generator, *shape: int, scale: float = 0.3) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=g)


def _module_state(prefix: str, module: nn.Module, g: torch.Generator) -> Dict[str, torch.Tensor]:
    """``module``'s state under ``prefix`` with every float tensor re-drawn (so LayerNorms are not 1/0)."""
    out = {}
    for k, v in module.state_dict().items():
        name = prefix + k
        if not v.is_floating_point():
            out[name] = v
        else:  # LayerNorm gains around 1, everything else around 0
            out[name] = _rand(g, *v.shape) + (1.0 if "norm" in name.lower() and k.endswith("weight") else 0.0)
    return out


def _attention_state(prefix: str, kind: str, heads: int, g: torch.Generator) -> Dict[str, torch.Tensor]:
    if kind == "MultiheadAttentionAndNorm":
        state = _module_state(prefix + "multihead_attn_layer.", nn.MultiheadAttention(D_MODEL, heads), g)
        state.update(_module_state(prefix + "attentionBlock_Norm.", nn.LayerNorm(D_MODEL), g))
        return state
    layer = nn.TransformerEncoderLayer(D_MODEL, heads, 64, activation="gelu", batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1, norm=nn.LayerNorm(D_MODEL), enable_nested_tensor=False)
    return _module_state(prefix + "model.", encoder, g)


def _projection_state(prefix: str, dims: List[int], g: torch.Generator) -> Dict[str, torch.Tensor]:
    """A Linear (two dims) or the reference MLP's ``sequential.{0,3,..}`` Linears."""
    if len(dims) == 2:
        return {prefix + "weight": _rand(g, dims[1], dims[0]), prefix + "bias": _rand(g, dims[1])}
    state = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        state[f"{prefix}sequential.{3 * i}.weight"] = _rand(g, b, a)
        state[f"{prefix}sequential.{3 * i}.bias"] = _rand(g, b)
    return state


def _bn_state(prefix: str, width: int, g: torch.Generator) -> Dict[str, torch.Tensor]:
    return {prefix + "weight": 1.0 + _rand(g, width), prefix + "bias": _rand(g, width),
            prefix + "running_mean": _rand(g, width), prefix + "running_var": 0.5 + torch.rand(width, generator=g),
            prefix + "num_batches_tracked": torch.tensor(123)}


def reference_state(variant: str, hubert_weights: Dict[str, torch.Tensor], clip_state: Dict[str, torch.Tensor],
                    vocab: Optional[List[int]] = None, seed: int = 0) -> "collections.OrderedDict[str, torch.Tensor]":
    """A state dict with the reference's names and layouts; frozen parts copied from the tiny models."""
    g = torch.Generator().manual_seed(seed)
    lay = LAYOUTS[variant]
    vocab = VOCAB if vocab is None else vocab
    s: Dict[str, torch.Tensor] = {"audio_encoder.weightedsum_layer.weights": _rand(g, N_STATES, scale=1.0)}
    s.update({"audio_encoder.encoder." + k: v.clone() for k, v in hubert_weights.items()})
    full = clip_state["token_embedding.weight"]
    clip = {("clip.model." + k): v.clone() for k, v in clip_state.items() if k != "token_embedding.weight"}
    clip["clip.model.token_embedding.weight"] = full[torch.tensor(vocab)].clone()
    clip["clip.original_text_emb_weight"] = full.clone()
    s.update(clip)
    if lay["temp_trainable"]:
        s["criterion.temperature"] = torch.tensor(2.9)  # log of the logit scale (initialised to ln(1/0.07))
    eye = torch.eye(256, dtype=torch.bool)
    s.update({"criterion.eye_mat": eye, "criterion.neg_eye_mat": ~eye, "criterion.eye_mat_fl": eye.float()})
    branch = "parallel_branch." if variant == "p" else "cascaded_branch."
    s.update(_attention_state(branch + "self_att.", lay["attention"], lay["heads"], g))
    if variant == "p":
        s["parallel_branch.cls"] = torch.randn(1, 1, D_MODEL, generator=g)
        s.update(_projection_state("parallel_branch.linear_proj.", [D_MODEL, EMBED_DIM], g))
        return collections.OrderedDict(s)
    if variant == "c":
        s["cascaded_branch.cls"] = torch.randn(1, N_KEYWORDS, D_MODEL, generator=g)
    elif variant == "h":
        s["cascaded_branch.parallel_cls"] = torch.randn(1, 1, D_MODEL, generator=g)
        s["cascaded_branch.cascaded_cls"] = torch.randn(1, N_KEYWORDS, D_MODEL, generator=g)
    elif variant == "hplus":
        s["cascaded_branch.cls"] = torch.randn(1, 1, D_MODEL, generator=g)
    if variant in ("h", "hplus"):
        s.update(_projection_state("cascaded_branch.parallel_proj.", lay.get("p_mlp", [D_MODEL, EMBED_DIM]), g))
    s.update(_projection_state("cascaded_branch.linear_proj.", lay.get("kw_mlp", [D_MODEL, TOKEN_DIM]), g))
    width = TOKEN_DIM * (N_KEYWORDS if variant in ("c", "h") else 1)
    s.update(_bn_state("cascaded_branch.bn_layer.bn_layer.", width, g))
    s["cascaded_branch.vector_quantizer.curr_temp"] = torch.tensor([0.1])
    if variant in ("cplus", "hplus"):
        for i in range(lay["cif_layers"]):
            s[f"cascaded_branch.downsampling.conv.{3 * i}.weight"] = _rand(g, D_MODEL, D_MODEL, lay["cif_width"],
                                                                         scale=0.1)
            s[f"cascaded_branch.downsampling.conv.{3 * i}.bias"] = _rand(g, D_MODEL, scale=0.1)
        s["cascaded_branch.downsampling.weight_proj.1.weight"] = _rand(g, 1, D_MODEL)
        s["cascaded_branch.downsampling.weight_proj.1.bias"] = torch.tensor([0.3])
    s.update({"cascaded_branch." + k: v for k, v in clip.items()})  # the shared CLIP, registered a second time
    return collections.OrderedDict(s)


def lightning_checkpoint(state: Dict[str, torch.Tensor], config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The Lightning top level around a state dict; the config (if any) as namespaces with a logger."""
    ckpt: Dict[str, Any] = {
        "epoch": 80, "global_step": 9476, "pytorch-lightning_version": "1.5.10",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 81, "completed": 80}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_recall_mean_10', 'mode': 'max'}": {
            "monitor": "val_recall_mean_10", "best_model_score": torch.tensor(81.03),
            "best_model_path": "/exp/epoch=80-step=9476.ckpt", "best_k_models": {}}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(9476.0), "exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 1e-4, "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 9476, "_step_count": 9477, "lr_lambdas": [None]}],
        "native_amp_scaling_state": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 11},
    }
    if config is not None:  # as_namespace builds new containers: ``config`` itself is left unchanged
        namespace = as_namespace(config)
        namespace._odict["trainer"]._odict["logger"] = WandbLogger(config["logger"]["project"], "run")
        ckpt["hparams_name"] = "kwargs"
        ckpt["hyper_parameters"] = {"config": namespace}
    return ckpt


def save_reference_checkpoint(path: str, ckpt: Dict[str, Any]) -> str:
    """``torch.save`` with the stand-ins importable under the reference's module names."""
    with reference_modules():
        torch.save(ckpt, path)
    return str(path)


def tiny_clip_state(seed: int = 0) -> Dict[str, torch.Tensor]:
    """The state dict of a tiny open_clip CLIP (random, seeded), as open_clip's loader reads it."""
    from speechclip_plus.models.clip import FrozenCLIP
    from speechclip_plus.models.tiny import TINY_CLIP_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = FrozenCLIP(TINY_CLIP_CONFIG, None)
    return {k: v.detach().clone() for k, v in clip.clip.state_dict().items()}

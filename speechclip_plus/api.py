"""Python API: load a trained SpeechCLIP/SpeechCLIP+ model, embed speech, images and text, read keywords.

    from speechclip_plus import SpeechCLIPPlus
    m = SpeechCLIPPlus.from_pretrained("exp/tiny_hplus/model.pt")   # or an exp dir, or hf://ORG/NAME[@REV]
    s = m.embed_speech(["a.wav", "b.wav"])                          # (N, E) unit-norm
    i = m.embed_image(["a.jpg"])                                     # (M, E) unit-norm
    m.similarity(s, i)                                               # (N, M) cosine
    m.keywords("a.wav")                                              # [{"token": "dog</w>", ...}, ...]

Model file (``export_model`` / ``read_model_file``), format ``speechclip_plus.model/1``: one
``torch.save``'d dict of plain containers and tensors only, readable by ``torch.load(weights_only=True)``:
``format``, ``config`` (resolved config), ``vocab_ids`` (the reduced keyword vocabulary, original CLIP ids),
``state_dict`` (the whole model, frozen CLIP and upstream included), ``upstream_model_config`` (the text of
``model.upstream.model_config``, e.g. s3prl feature settings, or None), ``upstream_ckpt`` (the content of the
s3prl upstream checkpoint named by ``model.upstream.ckpt``, or None), ``clip_model_config`` (the open_clip
model-config json when ``model.clip.name`` is a file, else None), ``clip_build`` (``quick_gelu`` and the
image ``preprocess_cfg``: settings CLIP takes from its pretrained tag that hold no weights), ``meta`` and
``digest`` (``content_digest`` of all the rest, checked on reading: a changed tensor byte is an error).
Loading never unpickles code (``weights_only=True``); files the model needs at build time (the upstream
checkpoint, the CLIP json) are written to the cache (``cache_dir()``) under their content hash, so the model
file alone rebuilds the model anywhere. The frozen upstream tensors are shared with ``state_dict`` in the
file, so it is stored once.

Inference is in eval mode under ``no_grad``; by default (``per_utterance="auto"``) the upstream runs on padded
batches when it is batch-invariant (filterbanks) and one utterance at a time when it is not (HuBERT, WavLM), so
an embedding never depends on what else is in its batch.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

FORMAT = "speechclip_plus.model/1"
SAMPLE_RATE = 16000
PathLike = Union[str, "os.PathLike[str]"]
Audio = Union[PathLike, np.ndarray, torch.Tensor]


class ModelFileError(ValueError):
    """A model file, checkpoint or exp dir that cannot be used (message names the file)."""


# ---------------------------------------------------------------------------------------------- cache
def cache_dir() -> str:
    """``$SPEECHCLIP_PLUS_CACHE``, else ``$XDG_CACHE_HOME/speechclip_plus``, else ``~/.cache/speechclip_plus``."""
    if os.environ.get("SPEECHCLIP_PLUS_CACHE"):
        return os.environ["SPEECHCLIP_PLUS_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "speechclip_plus")


def content_digest(obj: Any) -> str:
    """sha256 over a canonical walk of plain data (dict keys sorted; tensors by dtype, shape and bytes)."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(f"D{len(x)}:".encode())
            for k in sorted(x, key=repr):
                walk(k)
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"{'L' if isinstance(x, list) else 'U'}{len(x)}:".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"S{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def _torch_load_plain(path: str, what: str) -> Any:
    """``torch.load(weights_only=True)``; any failure (pickled code, truncation) -> ``ModelFileError``."""
    if not os.path.isfile(path):
        raise ModelFileError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every reader error becomes one clear message naming the file
        from .train.checkpoint import _load_error_detail

        raise ModelFileError(
            f"{path}: cannot be read as a {what} (corrupted, truncated, or it contains pickled objects other "
            f"than plain containers and tensors, which are never loaded): {_load_error_detail(e)}"
        ) from None


def _materialise(content: Any, kind: str, name: str, write) -> str:
    """Write ``content`` once to ``cache_dir()/kind/<digest>/name`` (atomic); reuse a verified copy."""
    from .io import atomic_path

    digest = content_digest(content)
    path = os.path.join(cache_dir(), kind, digest[:32], name)
    if os.path.isfile(path):
        try:
            if name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    existing = json.load(f)
            elif isinstance(content, str):
                with open(path, encoding="utf-8") as f:
                    existing = f.read()
            else:
                existing = torch.load(path, map_location="cpu", weights_only=True)
            if content_digest(existing) == digest:
                return path
        except Exception:  # noqa: BLE001 - an unreadable cache entry is rewritten
            pass
    with atomic_path(path) as tmp:
        write(content, tmp)
    return path


def _write_torch(obj: Any, path: str) -> None:
    torch.save(obj, path)


def _write_text(text: str, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_json(obj: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


# ---------------------------------------------------------------------------------------------- export
def _share_storage(content: Any, state: Dict[str, torch.Tensor]) -> Any:
    """``content`` with every tensor equal to a ``state`` tensor replaced by that tensor (stored once)."""
    index: Dict[Tuple, List[torch.Tensor]] = {}
    for t in state.values():
        index.setdefault((t.dtype, tuple(t.shape)), []).append(t)

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            for cand in index.get((x.dtype, tuple(x.shape)), []):
                if torch.equal(cand, x):
                    return cand
            return x
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, tuple):
            return tuple(walk(v) for v in x)
        return x

    return walk(content)


def _plain_config(obj: Any) -> Any:
    """A deep copy of a config with tuples as lists (YAML/JSON-like plain data)."""
    if isinstance(obj, dict):
        return {str(k): _plain_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_config(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ModelFileError(f"config value {obj!r} of type {type(obj).__name__} is not plain data")


def export_model(model, config: Dict, path: PathLike, meta: Optional[Dict] = None) -> str:
    """Write ``model`` (a ``SpeechCLIP``) and its resolved ``config`` as one self-contained model file.

    Layout in the module docstring. Written to a temporary name and renamed. Returns ``path``.
    """
    from .io import torch_save_atomic

    path = os.fspath(path)
    cfg = _plain_config(config if "model" in config else {"model": config})
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    up = cfg["model"]["upstream"]
    upstream_ckpt = None
    if up.get("ckpt"):
        upstream_ckpt = _torch_load_plain(up["ckpt"], "s3prl upstream checkpoint (model.upstream.ckpt)")
        upstream_ckpt = _share_storage(upstream_ckpt, state)
    upstream_model_config = None
    if up.get("model_config"):
        try:
            with open(up["model_config"], encoding="utf-8") as f:
                upstream_model_config = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFileError(f"model.upstream.model_config={up['model_config']}: cannot read: {e}") from None
    clip_name = cfg["model"]["clip"]["name"]
    clip_model_config = None
    if str(clip_name).endswith(".json") or os.path.isfile(str(clip_name)):
        try:
            with open(clip_name, encoding="utf-8") as f:
                clip_model_config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ModelFileError(f"model.clip.name={clip_name}: cannot read the open_clip model config: {e}") \
                from None
    visual_pp = getattr(getattr(model.clip.clip, "visual", None), "preprocess_cfg", None)
    payload = {
        "format": FORMAT,
        "config": cfg,
        "vocab_ids": [int(i) for i in model.clip.vocab_ids.tolist()],
        "state_dict": state,
        "upstream_ckpt": upstream_ckpt,
        "upstream_model_config": upstream_model_config,
        "clip_model_config": clip_model_config,
        "clip_build": {
            "quick_gelu": bool(model.clip.quick_gelu),
            "preprocess_cfg": _plain_config(dict(visual_pp)) if visual_pp else None,
        },
        "meta": _plain_config(dict(meta or {})),
    }
    payload["digest"] = content_digest(payload)
    torch_save_atomic(payload, path)
    return path


# ---------------------------------------------------------------------------------------------- loading
_REQUIRED = {"format": str, "config": dict, "vocab_ids": list, "state_dict": dict}


def read_model_file(path: PathLike) -> Dict[str, Any]:
    """Load and validate a model file (``weights_only``; nothing but plain data and tensors is accepted)."""
    path = os.fspath(path)
    payload = _torch_load_plain(path, "speechclip_plus model file")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(f"{path}: not a speechclip_plus model file (format {found!r}, expected {FORMAT!r})")
    for key, typ in _REQUIRED.items():
        if not isinstance(payload.get(key), typ):
            raise ModelFileError(f"{path}: key '{key}' missing or not a {typ.__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()):
        raise ModelFileError(f"{path}: 'state_dict' must map names to tensors")
    if not all(isinstance(i, int) for i in payload["vocab_ids"]):
        raise ModelFileError(f"{path}: 'vocab_ids' must be a list of ints")
    if "model" not in payload["config"]:
        raise ModelFileError(f"{path}: 'config' has no 'model' section")
    digest = payload.pop("digest", None)
    if digest != content_digest(payload):
        raise ModelFileError(f"{path}: content digest {'missing' if digest is None else 'mismatch'}: the file was "
                             "modified or damaged after export (re-export it)")
    return payload


def _apply_clip_build(model, build: Optional[Dict]) -> None:
    """Rebuild CLIP with the exported ``quick_gelu`` / image preprocessing where a random init differs."""
    if not build:
        return
    from .models.clip import FrozenCLIP

    clip = model.clip
    if bool(build.get("quick_gelu")) != bool(clip.quick_gelu):
        clip = FrozenCLIP(clip.name, None, clip.vocab_ids.tolist(), quick_gelu=bool(build["quick_gelu"]))
        model.clip = clip
    pp = build.get("preprocess_cfg")
    visual = getattr(clip.clip, "visual", None)
    if pp and visual is not None and _plain_config(dict(getattr(visual, "preprocess_cfg", {}) or {})) != pp:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in pp.items()}
        visual.preprocess_cfg = clean
        clip._preprocess = image_transform_v2(PreprocessCfg(**clean), is_train=False)


def model_from_payload(payload: Dict[str, Any], path: str = "<model file>"):
    """Rebuild the ``SpeechCLIP`` of a validated model-file payload (random init + ``load_state_dict``)."""
    from .config import ConfigError, model_config
    from .models.speechclip import SpeechCLIP

    cfg = copy.deepcopy(payload["config"])
    try:
        mcfg = model_config(cfg)
    except ConfigError as e:
        raise ModelFileError(f"{path}: bad config: {e}") from None
    if payload.get("upstream_ckpt") is not None:
        mcfg["upstream"]["ckpt"] = _materialise(payload["upstream_ckpt"], "upstream", "upstream.pt", _write_torch)
    elif mcfg["upstream"]["ckpt"]:
        raise ModelFileError(f"{path}: model.upstream.ckpt is set but the file holds no upstream checkpoint")
    if payload.get("upstream_model_config") is not None:
        name = os.path.basename(str(mcfg["upstream"]["model_config"])) or "upstream.yaml"
        mcfg["upstream"]["model_config"] = _materialise(payload["upstream_model_config"], "upstream_configs", name,
                                                        _write_text)
    if payload.get("clip_model_config") is not None:
        stem = os.path.splitext(os.path.basename(str(mcfg["clip"]["name"])))[0] or "clip"
        mcfg["clip"]["name"] = _materialise(payload["clip_model_config"], "clip_configs", f"{stem}.json",
                                            _write_json)
    model = SpeechCLIP(mcfg, vocab_ids=payload["vocab_ids"], clip_pretrained=None)
    _apply_clip_build(model, payload.get("clip_build"))
    try:
        result = model.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = " ".join(str(e).split())
        raise ModelFileError(f"{path}: weights do not fit the model built from its config: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelFileError(
            f"{path}: weights do not match the model built from its config: missing {result.missing_keys[:6]}, "
            f"unexpected {result.unexpected_keys[:6]}"
        )
    return model.eval()


def load_model_file(path: PathLike):
    """Model file -> (``SpeechCLIP`` in eval mode, resolved config dict, meta dict)."""
    path = os.fspath(path)
    payload = read_model_file(path)
    return model_from_payload(payload, path), payload["config"], dict(payload.get("meta") or {})


def resolve_checkpoint(exp_dir: PathLike, checkpoint: str = "best") -> str:
    """``best`` | ``last`` -> ``<exp_dir>/checkpoints/<name>.pt``; anything else is taken as a path."""
    exp_dir = os.fspath(exp_dir)
    if checkpoint in ("best", "last"):
        path = os.path.join(exp_dir, "checkpoints", f"{checkpoint}.pt")
        if not os.path.isfile(path):
            other = os.path.join(exp_dir, "checkpoints", "last.pt" if checkpoint == "best" else "best.pt")
            hint = f" ({os.path.basename(other)} exists: pass --checkpoint {os.path.basename(other)[:-3]})" \
                if os.path.isfile(other) else ""
            raise ModelFileError(f"{exp_dir}: no {checkpoint} checkpoint ({path} not found){hint}")
        return path
    if not os.path.isfile(checkpoint):
        raise ModelFileError(f"checkpoint not found: {checkpoint}")
    return checkpoint


def exp_config(exp_dir: PathLike) -> Dict:
    """The resolved ``<exp_dir>/config.yaml`` (validated)."""
    from .config import ConfigError, load_config

    path = os.path.join(os.fspath(exp_dir), "config.yaml")
    if not os.path.isfile(path):
        raise ModelFileError(f"{exp_dir}: not an experiment dir ({path} not found)")
    try:
        return load_config(path)
    except ConfigError as e:
        raise ModelFileError(str(e)) from None


def build_untrained(cfg: Dict):
    """A freshly initialised model from ``cfg`` (seeded with ``train.seed``, as training starts), eval mode."""
    from .models.speechclip import build_model

    seed = int(cfg.get("train", {}).get("seed", 0))
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_model(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def load_exp_dir(exp_dir: PathLike, checkpoint: str = "best"):
    """Exp dir -> (``SpeechCLIP`` with the checkpoint's weights, config, meta {checkpoint, step}).

    The model is built from ``config.yaml`` (frozen parts the checkpoint left out come from their own
    loaders), then the checkpoint's ``model`` state is loaded.
    """
    from .models.speechclip import build_model
    from .train.checkpoint import load_model_state

    exp_dir = os.fspath(exp_dir)
    cfg = exp_config(exp_dir)
    path = resolve_checkpoint(exp_dir, checkpoint)
    ckpt = _torch_load_plain(path, "training checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ModelFileError(f"{path}: not a training checkpoint (no 'model' state dict)")
    model = build_model(cfg)
    try:
        load_model_state(model, ckpt["model"], ckpt.get("model_excluded", ()))
    except RuntimeError as e:
        raise ModelFileError(f"{path}: {e}") from None
    meta = {"checkpoint": os.path.abspath(path), "step": ckpt.get("step")}
    return model.eval(), cfg, meta


def load_any(path: PathLike, checkpoint: str = "best"):
    """A model file, an exp dir or ``hf://ORG/NAME[@REVISION]`` (``speechclip_plus.hub``) -> (model, config, meta).

    A Hub model file is read like a local one; its meta gains ``hub`` (uri, repo_id, revision, commit).
    """
    path = os.fspath(path)
    if path.startswith("hf://"):
        from .hub import HubError, fetch_model

        try:
            found = fetch_model(path)
        except HubError as e:
            raise ModelFileError(str(e)) from None
        model, cfg, meta = load_model_file(found.pop("path"))
        return model, cfg, {**meta, "hub": found}
    if os.path.isdir(path):
        return load_exp_dir(path, checkpoint)
    return load_model_file(path)


# ---------------------------------------------------------------------------------------------- audio
def read_audio(path: PathLike) -> Tuple[torch.Tensor, int]:
    """A sound file -> (1-D float32 mono tensor, its sample rate); channels are averaged."""
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read audio: {e}") from None
    return torch.from_numpy(data.mean(axis=1)), int(sr)


def to_16k(audio: Audio, sample_rate: Optional[int] = None, where: str = "wav") -> torch.Tensor:
    """A path, 1-D numpy array or tensor -> 1-D float32 tensor at 16 kHz.

    Files are read at their own rate (``sample_rate``, if given, must match it); arrays and tensors need
    ``sample_rate``. Other rates are converted with ``torchaudio.functional.resample``.
    """
    if isinstance(audio, (str, os.PathLike)):
        wav, sr = read_audio(audio)
        if sample_rate is not None and int(sample_rate) != sr:
            raise ValueError(f"{os.fspath(audio)}: file is {sr} Hz but sample_rate={sample_rate} was given")
    elif isinstance(audio, (np.ndarray, torch.Tensor)):
        if sample_rate is None:
            raise ValueError(f"{where}: arrays and tensors need sample_rate (e.g. sample_rate=16000)")
        wav = torch.as_tensor(audio).detach().cpu()
        if wav.dim() != 1:
            raise ValueError(f"{where}: expected a 1-D (mono) waveform, got shape {tuple(wav.shape)}")
        wav, sr = wav.float(), int(sample_rate)
    else:
        raise TypeError(f"{where}: expected a path, numpy array or tensor, got {type(audio).__name__}")
    if wav.numel() == 0:
        raise ValueError(f"{where}: empty waveform")
    if sr != SAMPLE_RATE:
        import torchaudio.functional as AF

        wav = AF.resample(wav, sr, SAMPLE_RATE)
    return wav.contiguous()


def pad_batch(wavs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """1-D waveforms -> zero-padded (B, L_max) and lengths (B,)."""
    lens = torch.tensor([len(w) for w in wavs], dtype=torch.long)
    return torch.nn.utils.rnn.pad_sequence(list(wavs), batch_first=True), lens


def eval_forward(model, wav: torch.Tensor, wav_len: torch.Tensor, texts: Optional[Sequence[str]] = None,
                 target_lengths: Optional[torch.Tensor] = None) -> Dict:
    """``model(wav, wav_len)`` in eval mode under ``no_grad``.

    CIF keyword-count targets are not used at inference; for ``cif.target`` other than ``duration`` the
    model still wants texts or lengths to report them, so without either a placeholder is passed and
    ``cif_targets`` is removed from the output.
    """
    cif_target = model.cfg["cif"]["target"] if getattr(model, "has_cif", False) else "duration"
    placeholder = (cif_target != "duration" and target_lengths is None
                   and (cif_target != "clip_bpe" or texts is None))
    if placeholder:
        target_lengths = torch.ones(len(wav), dtype=torch.long)
    with torch.no_grad():
        out = model(wav, wav_len, texts=texts, target_lengths=target_lengths)
    if placeholder:
        out.pop("cif_targets", None)
    return out


def branch_embedding(out: Dict, branch: str) -> torch.Tensor:
    """``parallel`` / ``cascaded`` from a forward output, or ``combined`` = normalize(parallel + cascaded)."""
    if branch == "combined":
        if "parallel" not in out or "cascaded" not in out:
            raise ValueError("branch 'combined' needs a hybrid model (parallel and cascaded branches)")
        return F.normalize(out["parallel"].float() + out["cascaded"].float(), dim=-1)
    if branch not in out:
        raise ValueError(f"the model has no '{branch}' branch")
    return out[branch].float()


def keyword_spans(alpha: torch.Tensor, n_keywords: int, feat_len: int, threshold: float) -> List[Tuple[int, int]]:
    """Frame span [start, end] (inclusive) of each CIF keyword from the integrated weights ``alpha`` (T,).

    With c_s = sum_{t<=s} alpha_t, keyword k integrates the frames whose [c_{s-1}, c_s) meets
    [k beta, (k+1) beta): it starts at the first s with c_s > k beta and ends at the first s with
    c_s >= (k+1) beta (the frame where it fires); a tail keyword ends at the last valid frame.
    """
    c = torch.cumsum(alpha[:feat_len].double(), 0)
    last = max(feat_len - 1, 0)
    spans = []
    for k in range(n_keywords):
        start = int(torch.searchsorted(c, torch.tensor([k * threshold], dtype=c.dtype), right=True))
        end = int(torch.searchsorted(c, torch.tensor([(k + 1) * threshold], dtype=c.dtype), right=False))
        start, end = min(start, last), min(end, last)
        spans.append((start, max(start, end)))
    return spans


# ---------------------------------------------------------------------------------------------- API
class SpeechCLIPPlus:
    """Inference wrapper around a ``SpeechCLIP`` model (eval mode, ``no_grad``).

    The wrapped model is moved to ``device``, put in eval mode and its ``upstream.per_utterance`` set (True,
    False or "auto": one utterance at a time only when the upstream is not batch-invariant).
    """

    def __init__(self, model, config: Optional[Dict] = None, device: Union[str, torch.device] = "cpu",
                 per_utterance: Union[bool, str] = "auto", meta: Optional[Dict] = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if per_utterance not in (True, False, "auto"):
            raise ValueError(f"per_utterance must be True, False or 'auto', got {per_utterance!r}")
        self.model.upstream.per_utterance = per_utterance
        self.config = config if config is not None else {"model": model.cfg}
        self.meta = dict(meta or {})

    @classmethod
    def from_pretrained(cls, path: PathLike, device: Union[str, torch.device] = "cpu", checkpoint: str = "best",
                        per_utterance: Union[bool, str] = "auto") -> "SpeechCLIPPlus":
        """A model file from ``bin.export`` / ``bin.import_reference``, an exp dir (its ``checkpoint``: best |
        last | a path), or a model shared on the Hugging Face Hub: ``hf://ORG/NAME[@REVISION]``."""
        model, cfg, meta = load_any(path, checkpoint)
        return cls(model, cfg, device, per_utterance, meta)

    # ------------------------------------------------------------------ properties
    @property
    def branches(self) -> List[str]:
        """Embedding branches: the model's, plus ``combined`` for hybrids."""
        b = list(self.model.branches)
        return b + ["combined"] if len(b) == 2 else b

    @property
    def retrieval_branch(self) -> str:
        return self.model.retrieval_branch

    @property
    def embed_dim(self) -> int:
        return int(self.model.clip.embed_dim)

    def _audio(self, wavs, sample_rate) -> List[torch.Tensor]:
        items = list(wavs) if isinstance(wavs, (list, tuple)) else [wavs]
        if not items:
            raise ValueError("no waveforms given")
        return [to_16k(w, sample_rate, f"wavs[{i}]") for i, w in enumerate(items)]

    def _forward(self, wavs: Sequence[torch.Tensor]) -> Dict:
        wav, lens = pad_batch(wavs)
        return eval_forward(self.model, wav.to(self.device), lens.to(self.device))

    # ------------------------------------------------------------------ embeddings
    def embed_speech(self, wavs, sample_rate: Optional[int] = None, branch: Optional[str] = None,
                     batch_size: int = 16) -> torch.Tensor:
        """Paths / 1-D arrays / tensors (one or a list) -> (N, E) unit-norm embeddings of ``branch``.

        branch: None (the model's retrieval branch), ``parallel``, ``cascaded`` or ``combined`` (hybrids).
        Utterances are batched by length; the result is in input order.
        """
        branch = branch or self.retrieval_branch
        if branch not in self.branches:
            raise ValueError(f"branch '{branch}' not available; this model has {', '.join(self.branches)}")
        audio = self._audio(wavs, sample_rate)
        order = sorted(range(len(audio)), key=lambda i: -len(audio[i]))
        result = torch.empty(len(audio), self.embed_dim)
        for s in range(0, len(order), max(1, int(batch_size))):
            idx = order[s:s + batch_size]
            out = self._forward([audio[i] for i in idx])
            result[idx] = branch_embedding(out, branch).cpu()
        return result

    def embed_image(self, images, batch_size: int = 32) -> torch.Tensor:
        """Image paths or PIL images (one or a list) -> (N, E) unit-norm CLIP image embeddings."""
        from PIL import Image

        items = list(images) if isinstance(images, (list, tuple)) else [images]
        tensors = []
        for i, im in enumerate(items):
            if isinstance(im, (str, os.PathLike)):
                if not os.path.isfile(im):
                    raise FileNotFoundError(f"{os.fspath(im)}: image file not found")
                try:
                    with Image.open(im) as f:
                        im = f.convert("RGB")
                except Exception as e:  # noqa: BLE001
                    raise ValueError(f"{os.fspath(items[i])}: cannot read image: {e}") from None
            elif not isinstance(im, Image.Image):
                raise TypeError(f"images[{i}]: expected a path or PIL image, got {type(im).__name__}")
            tensors.append(self.model.clip.preprocess(im.convert("RGB")))
        out = []
        with torch.no_grad():
            for s in range(0, len(tensors), batch_size):
                pixels = torch.stack(tensors[s:s + batch_size]).to(self.device)
                out.append(self.model.encode_image(pixels).float().cpu())
        return torch.cat(out)

    def embed_text(self, texts) -> torch.Tensor:
        """Texts (one or a list) -> (N, E) unit-norm embeddings from CLIP's text tower."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        with torch.no_grad():
            return self.model.clip.encode_text(texts).float().cpu()

    @staticmethod
    def similarity(speech_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """(N, E), (M, E) -> (N, M) cosine similarities."""
        a = F.normalize(torch.as_tensor(speech_emb).float(), dim=-1)
        b = F.normalize(torch.as_tensor(image_emb).float(), dim=-1)
        return a @ b.T

    # ------------------------------------------------------------------ keywords and states
    def keywords(self, wav: Audio, sample_rate: Optional[int] = None) -> List[Dict[str, Any]]:
        """One utterance -> its keywords, in order: ``token`` (CLIP BPE string, ``</w>`` = word end),
        ``token_id`` (original CLIP id), ``neighbours`` (the 5 nearest token strings), ``start`` / ``end``
        (seconds; the CIF span of the keyword, None for fixed-CLS keywords)."""
        if "cascaded" not in self.model.branches:
            raise ValueError(f"variant '{self.model.variant}' has no keywords (no cascaded branch)")
        audio = to_16k(wav, sample_rate)
        out = self._forward([audio])
        return keywords_from_output(self.model, out, 0, len(audio))

    def hidden_states(self, wav: Audio, sample_rate: Optional[int] = None) -> List[torch.Tensor]:
        """One utterance -> the frame-level states SUPERB sees: list of (T, D) tensors."""
        audio = to_16k(wav, sample_rate).to(self.device)
        with torch.no_grad():
            lens = torch.tensor([len(audio)], device=self.device)
            states, feat_lens = self.model.hidden_states(audio[None], lens)
        n = int(feat_lens[0])
        return [h[0, :n].float().cpu() for h in states]


def keywords_from_output(model, out: Dict, b: int, n_samples: int) -> List[Dict[str, Any]]:
    """Keyword dicts of utterance ``b`` of a forward output (see ``SpeechCLIPPlus.keywords``)."""
    k = int(out["keyword_lengths"][b])
    ids = [int(i) for i in out["keyword_ids"][b, :k].tolist()]
    neigh = out["keyword_neighbours"][b, :k].tolist()
    tokens = model.clip.decode_ids(ids)
    spans: List[Tuple[Optional[float], Optional[float]]] = [(None, None)] * k
    if "cif_alpha" in out:
        hop = model.upstream.downsample_rate / SAMPLE_RATE
        dur = n_samples / SAMPLE_RATE
        beta = model.cfg["cif"]["threshold"]
        frames = keyword_spans(out["cif_alpha"][b].cpu(), k, int(out["feat_lens"][b]), beta)
        spans = [(round(min(s * hop, dur), 4), round(min((e + 1) * hop, dur), 4)) for s, e in frames]
    return [
        {"token": tok, "token_id": i, "neighbours": model.clip.decode_ids(n), "start": s, "end": e}
        for tok, i, n, (s, e) in zip(tokens, ids, neigh, spans)
    ]

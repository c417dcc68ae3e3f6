"""Python API: load a trained SpeechCLIP/SpeechCLIP+ model, embed speech, images and text, read keywords.

    from speechclip_plus import SpeechCLIPPlus
    m = SpeechCLIPPlus.from_pretrained("exp/tiny_hplus/model.pt")   # or an exp dir, or hf://ORG/NAME[@REV]
    s = m.embed_speech(["a.wav", "b.wav"])                          # (N, E) unit-norm
    i = m.embed_image(["a.jpg"])                                     # (M, E) unit-norm
    m.similarity(s, i)                                               # (N, M) cosine
    m.keywords("a.wav")                                              # [{"token": "dog</w>", ...}, ...]

Models are read and written by ``speechclip_plus.model_file`` (the model-file format and its safety, exp dirs,
the Hub); its names are re-exported here. Inference is in eval mode under ``no_grad``; by default
(``per_utterance="auto"``) the upstream runs on padded batches when it is batch-invariant (filterbanks) and one
utterance at a time when it is not (HuBERT, WavLM), so an embedding never depends on what else is in its batch.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .model_file import (FORMAT, ModelFileError, build_untrained, cache_dir, content_digest, exp_config,
                         export_model, load_any, load_exp_dir, load_model_file, model_from_payload, read_model_file,
                         resolve_checkpoint)

__all__ = ["FORMAT", "SAMPLE_RATE", "ModelFileError", "SpeechCLIPPlus", "branch_embedding", "build_untrained",
           "cache_dir", "content_digest", "eval_forward", "exp_config", "export_model", "keyword_spans",
           "keywords_from_output", "load_any", "load_exp_dir", "load_model_file", "model_from_payload", "pad_batch",
           "read_model_file", "resolve_checkpoint", "to_16k"]

SAMPLE_RATE = 16000
PathLike = Union[str, "os.PathLike[str]"]
Audio = Union[PathLike, np.ndarray, torch.Tensor]


# ---------------------------------------------------------------------------------------------- audio
def to_16k(audio: Audio, sample_rate: Optional[int] = None, where: str = "wav") -> torch.Tensor:
    """A path, 1-D numpy array or tensor -> 1-D float32 tensor at 16 kHz.

    Files are read by the data layer's reader (``data.audio.read_audio``: channels averaged) at their own rate
    (``sample_rate``, if given, must match it); arrays and tensors need ``sample_rate``. Other rates are
    converted with ``torchaudio.functional.resample``. A missing file is a ``FileNotFoundError``; audio the
    recipes refuse (unreadable, no samples, NaN/inf, silent) is a ``DataError`` with the recipes' message.
    """
    from .data.audio import read_audio, samples_problem, to_mono
    from .data.datadir import DataError

    if isinstance(audio, (str, os.PathLike)):
        where = os.fspath(audio)
        if not os.path.isfile(where):
            raise FileNotFoundError(f"{where}: audio file not found")
        data, sr = read_audio(where, silence=True)
        if sample_rate is not None and int(sample_rate) != sr:
            raise ValueError(f"{where}: file is {sr} Hz but sample_rate={sample_rate} was given")
        wav = torch.from_numpy(to_mono(data))
    elif isinstance(audio, (np.ndarray, torch.Tensor)):
        if sample_rate is None:
            raise ValueError(f"{where}: arrays and tensors need sample_rate (e.g. sample_rate=16000)")
        wav = torch.as_tensor(audio).detach().cpu()
        if wav.dim() != 1:
            raise ValueError(f"{where}: expected a 1-D (mono) waveform, got shape {tuple(wav.shape)}")
        wav, sr = wav.float(), int(sample_rate)
        problem = samples_problem(wav.numpy(), where, silence=True)
        if problem:
            raise DataError(problem)
    else:
        raise TypeError(f"{where}: expected a path, numpy array or tensor, got {type(audio).__name__}")
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

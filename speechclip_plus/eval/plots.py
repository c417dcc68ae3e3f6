"""Figures for the scoring stage, drawn with matplotlib's Agg canvas (no display, no pyplot state) and saved
atomically as PNG.

- ``plot_cif_segmentation``: log-mel spectrogram of one utterance, the CIF weight of each frame on a second
  y axis, a vertical line at each fire and each keyword written in its segment. Segment j runs from fire j-1
  (or the start) to fire j; a keyword beyond the last fire (the inference-time tail) runs to the end.
- ``plot_retrieval_examples``: one row per spoken query (its caption above), its top retrieved images left to
  right, the correct one framed green.
- ``plot_keyword_metrics_by_k``: keyword metrics (``keywords.keyword_metrics``' ``by_k``) against the K bin, one
  panel per metric in percent and a last panel with the utterances per bin, one line per model (e.g. c and c+).
- ``plot_text_retrieval_examples``: one block per spoken query (its caption as the heading), its top retrieved
  texts numbered below, the correct one in bold green.

Output size in pixels is fixed by the arguments (``figsize * dpi``; no tight bounding box).
"""
from __future__ import annotations

import math
import textwrap
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from speechclip_plus.eval.keywords import K_BINS
from speechclip_plus.io import atomic_path

N_MELS = 80
N_FFT = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms at 16 kHz


def log_mel(wav: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
    """Log-mel spectrogram (N_MELS, frames): 25 ms windows every 10 ms (scaled to ``sample_rate``),
    natural log of the power with a 1e-10 floor."""
    import torch
    import torchaudio

    n_fft = max(16, round(N_FFT * sample_rate / 16000))
    hop = max(1, round(HOP * sample_rate / 16000))
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop,
                                               n_mels=N_MELS)
    spec = mel(torch.as_tensor(np.asarray(wav, dtype=np.float32)))
    return spec.clamp(min=1e-10).log().numpy()


def _save(fig: Figure, path: str, dpi: float) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def plot_cif_segmentation(path: str, wav: np.ndarray, alpha: Sequence[float], fire_frames: Sequence[int],
                          keywords: Sequence[str], frame_rate_hz: float, title: str = "",
                          sample_rate: int = 16000, figsize: Tuple[float, float] = (12.0, 4.0),
                          dpi: float = 100) -> None:
    """Spectrogram of ``wav`` with CIF weights ``alpha`` (one per encoder frame at ``frame_rate_hz``), fire
    lines at the centre of frames ``fire_frames`` (a frame that fires twice may appear twice) and ``keywords``
    (at most one more than the fires) written between them. Saved as a PNG of ``figsize * dpi`` pixels."""
    wav = np.asarray(wav, dtype=np.float32)
    alpha = np.asarray(alpha, dtype=np.float64)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(f"{path}: wav must be a non-empty 1-D array, got shape {wav.shape}")
    if alpha.ndim != 1 or alpha.size == 0:
        raise ValueError(f"{path}: alpha must be a non-empty 1-D array, got shape {alpha.shape}")
    if not frame_rate_hz > 0:
        raise ValueError(f"{path}: frame_rate_hz must be positive, got {frame_rate_hz}")
    fires = sorted(int(f) for f in fire_frames)
    if fires and (fires[0] < 0 or fires[-1] >= alpha.size):
        raise ValueError(f"{path}: fire frames must lie in 0..{alpha.size - 1}, got {fires[0]}..{fires[-1]}")
    if len(keywords) > len(fires) + 1:
        raise ValueError(f"{path}: {len(keywords)} keywords for {len(fires)} fires (at most one tail keyword)")

    duration = wav.size / sample_rate
    frame_t = (np.arange(alpha.size) + 0.5) / frame_rate_hz
    x_max = max(duration, alpha.size / frame_rate_hz)
    fig = Figure(figsize=figsize, dpi=dpi)
    ax = fig.add_axes((0.06, 0.13, 0.87, 0.75))
    spec = log_mel(wav, sample_rate)
    ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=(0.0, duration, 0.0, spec.shape[0]),
              interpolation="nearest")
    ax.set_xlim(0.0, x_max)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel bin")
    twin = ax.twinx()
    twin.plot(frame_t, alpha, color="cyan", linewidth=1.2, label="CIF weight")
    twin.set_ylim(0.0, max(1.0, float(alpha.max()) * 1.05))
    twin.set_ylabel("CIF weight")
    fire_t = [(f + 0.5) / frame_rate_hz for f in fires]
    for t in fire_t:
        ax.axvline(t, color="white", linewidth=1.0, linestyle="--")
    bounds = [0.0] + fire_t + [x_max]
    rotate = len(keywords) > 0 and x_max / len(keywords) < 0.25  # crowded: write vertically
    for j, kw in enumerate(keywords):
        ax.text((bounds[j] + bounds[j + 1]) / 2, 0.97, kw, transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=8, rotation=90 if rotate else 0, color="black",
                bbox=dict(boxstyle="round,pad=0.15", facecolor="white", alpha=0.8, linewidth=0))
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi)


def _load_image(img: Any, where: str) -> np.ndarray:
    if isinstance(img, str):
        from PIL import Image

        try:
            with Image.open(img) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as e:
            raise ValueError(f"{where}: cannot read image {img}: {e}") from None
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{where}: expected an image path or an H x W x 3 array, got shape {arr.shape}")
    return arr


def plot_retrieval_examples(path: str, queries: Sequence[Tuple[str, Sequence[Any], Optional[int]]],
                            cell_inches: Tuple[float, float] = (2.0, 2.5), dpi: float = 100) -> None:
    """Grid of retrieval examples: ``queries`` holds ``(caption, top images, correct index or None)`` per
    query, images given as paths or H x W x 3 arrays (uint8, or floats in [0, 1]). The figure is
    ``cell_inches * (columns, rows) * dpi`` pixels, with columns = the longest image list."""
    if not queries:
        raise ValueError(f"{path}: no queries to plot")
    ncols = max(len(q[1]) for q in queries)
    if ncols == 0:
        raise ValueError(f"{path}: every query has an empty image list")
    nrows = len(queries)
    fig = Figure(figsize=(cell_inches[0] * ncols, cell_inches[1] * nrows), dpi=dpi)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.99 - 0.35 / (cell_inches[1] * nrows),
                        hspace=0.35, wspace=0.05)
    for r, query in enumerate(queries):
        if len(query) != 3:
            raise ValueError(f"{path}: query {r} must be (caption, images, correct index or None)")
        caption, images, correct = query
        if correct is not None and not 0 <= int(correct) < len(images):
            raise ValueError(f"{path}: query {r}: correct index {correct} outside 0..{len(images) - 1}")
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            arr = _load_image(images[c], f"{path}: query {r} image {c}")
            ax.imshow(arr)
            ax.text(0.03, 0.97, f"#{c + 1}", transform=ax.transAxes, ha="left", va="top", fontsize=8,
                    bbox=dict(boxstyle="round,pad=0.15", facecolor="white", alpha=0.8, linewidth=0))
            for spine in ax.spines.values():
                spine.set_visible(False)
            if correct is not None and c == int(correct):
                ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, edgecolor="lime",
                                       linewidth=6, clip_on=False))
        text = textwrap.shorten(str(caption), width=int(18 * cell_inches[0] * ncols), placeholder=" ...")
        axes[r, 0].set_title(text, loc="left", fontsize=9)
    _save(fig, path, dpi)


BY_K_METRICS = (("subword_hit_rate", "subword hit rate"), ("coverage", "coverage"),
                ("word_coverage", "word coverage"), ("excess_duplicate_rate", "excess duplicates"),
                ("adjacent_repeat_rate", "adjacent repeats"))


def plot_keyword_metrics_by_k(path: str, series: Mapping[str, Mapping[str, Mapping[str, Any]]],
                              metrics: Sequence[Tuple[str, str]] = BY_K_METRICS, ncols: int = 3,
                              panel_inches: Tuple[float, float] = (3.5, 2.6), dpi: float = 100) -> None:
    """Keyword metrics by K bin: ``series`` maps a model label to its ``by_k`` dict (bin label -> metrics with
    ``n_utterances``). One panel per ``(key, title)`` of ``metrics`` (values in %, y from 0 or the lowest
    negative value to 100; a missing or NaN value leaves a gap) and one of utterance counts; the x axis holds
    the bins of any series, in ``K_BINS`` order. The figure is ``panel_inches * (ncols, rows) * dpi`` pixels."""
    order = [label for label, _, _ in K_BINS]
    if not series:
        raise ValueError(f"{path}: no series to plot")
    for name, by_k in series.items():
        unknown = [b for b in by_k if b not in order]
        if unknown:
            raise ValueError(f"{path}: series {name!r}: unknown K bin(s) {unknown}; bins: {order}")
    bins = [b for b in order if any(b in by_k for by_k in series.values())]
    if not bins:
        raise ValueError(f"{path}: every series is empty")
    if not metrics or ncols < 1:
        raise ValueError(f"{path}: need at least one metric and ncols >= 1")
    panels = list(metrics) + [("n_utterances", "utterances")]
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(panel_inches[0] * ncols, panel_inches[1] * nrows), dpi=dpi)
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.9, hspace=0.55, wspace=0.3)
    x = np.arange(len(bins))
    for ax, (key, title) in zip(axes, panels):
        scale = 1.0 if key == "n_utterances" else 100.0
        lowest = 0.0
        for name, by_k in series.items():
            y = [by_k.get(b, {}).get(key) for b in bins]
            y = [math.nan if v is None else scale * float(v) for v in y]
            lowest = min([lowest] + [v for v in y if not math.isnan(v)])
            ax.plot(x, y, marker="o", label=name)
        if key == "n_utterances":
            ax.set_ylim(bottom=0.0)
        else:  # rates on one scale from 0 (or the lowest negative excess) to 100 %
            ax.set_ylim(lowest - 5.0 if lowest < 0 else -2.0, 102.0)
        ax.set_xlim(-0.5, len(bins) - 0.5)
        ax.set_title(title + ("" if key == "n_utterances" else " (%)"), fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels(bins, fontsize=8)
        ax.set_xlabel("K", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels):]:
        ax.axis("off")
    axes[0].legend(fontsize=8)
    _save(fig, path, dpi)


def plot_text_retrieval_examples(path: str, queries: Sequence[Tuple[str, Sequence[str], Optional[int]]],
                                 title: str = "", width_inches: float = 10.0, line_inches: float = 0.28,
                                 dpi: float = 100) -> None:
    """Text retrieval examples: ``queries`` holds ``(caption, top texts, correct index or None)`` per spoken
    query. The figure is ``width_inches`` wide and ``line_inches`` per text line (+ a heading line per query
    and one for ``title``) high, times ``dpi`` pixels."""
    if not queries:
        raise ValueError(f"{path}: no queries to plot")
    for r, query in enumerate(queries):
        if len(query) != 3:
            raise ValueError(f"{path}: query {r} must be (caption, texts, correct index or None)")
        if not query[1]:
            raise ValueError(f"{path}: query {r} has no texts")
        if query[2] is not None and not 0 <= int(query[2]) < len(query[1]):
            raise ValueError(f"{path}: query {r}: correct index {query[2]} outside 0..{len(query[1]) - 1}")
    n_lines = sum(1 + len(q[1]) for q in queries) + (1 if title else 0) + len(queries) - 1
    height = line_inches * (n_lines + 1)
    fig = Figure(figsize=(width_inches, height), dpi=dpi)
    chars = int(13 * width_inches)
    y = 1.0 - 0.5 / (n_lines + 1)
    step = 1.0 / (n_lines + 1)
    if title:
        fig.text(0.01, y, textwrap.shorten(title, width=chars, placeholder=" ..."), fontsize=10, va="center",
                 fontweight="bold")
        y -= step
    for r, (caption, texts, correct) in enumerate(queries):
        fig.text(0.01, y, textwrap.shorten(f"spoken: {caption}", width=chars, placeholder=" ..."), fontsize=9,
                 va="center", style="italic")
        y -= step
        for c, text in enumerate(texts):
            hit = correct is not None and c == int(correct)
            fig.text(0.03, y, textwrap.shorten(f"#{c + 1}  {text}", width=chars - 4, placeholder=" ..."),
                     fontsize=9, va="center", color="green" if hit else "black",
                     fontweight="bold" if hit else "normal")
            y -= step
        y -= step if r < len(queries) - 1 else 0
    _save(fig, path, dpi)

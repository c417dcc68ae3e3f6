"""Scoring pipeline (recipe stage 5): embed a data dir with a model, then retrieval, keywords, plots, files.

Steps of ``score``:
1. Every utterance of the data dir goes through the model in eval mode (``embed_data_dir``: batches of
   similar length, upstream run per utterance by default so nothing depends on batch composition).
2. Retrieval per branch (``parallel``, ``cascaded``; for hybrids also ``combined`` =
   normalize(parallel + cascaded)) against the data dir's images, whose embeddings come from the stage-2
   cache and are L2-normalised here: ``eval.retrieval.recall_at_k``, R@1/5/10 both ways, fractions in [0, 1].
   Every image used by an utterance is a candidate (images of ``img.scp`` without an utterance are not).
3. Zero-shot speech <-> text retrieval (SpeechCLIP's own evaluation), for the branches that live in CLIP's
   space: ``parallel`` (projected onto CLIP's joint space: SpeechCLIP's reported number) and ``cascaded``
   (the output of CLIP's text tower on the keywords). The candidates are the CLIP text embeddings
   (``encode_text``, unit norm) of the set's distinct transcriptions (``normalize_caption``); two captions
   are the same text when CLIP's tokenizer gives them the same tokens (case and spacing do not matter: they
   embed identically), so a repeated caption is one candidate. Speech -> text: an utterance is correct if
   its own transcription ranks in the top k; text -> speech: a text is correct if any utterance with that
   transcription ranks in the top k. Same chunked code and tie rule as step 2 (``recall_at_k`` with
   ``names=("speech_to_text", "text_to_speech")``). No speech-text pairs were used in training.
   Chance levels (``chance_recall``: random scores) of every recall go to ``results["chance"]``; recalls that
   are 1 for any model (too few candidates) are logged as a warning.
4. Keywords (cascaded branches). The published keyword metrics were never released; these definitions are
   ours (``eval.keywords``, whose docstring defines each metric). An utterance's keywords are the CLIP token
   ids its K slots quantise to (K = n_keywords for ``c``/``h``, the CIF count for ``c+``/``h+``) with their 5
   nearest tokens, compared with the CLIP BPE ids of its transcription (``normalize_caption``, open_clip's
   tokenizer, no SOT/EOT) and its words: subword and word hit rates (pooled and per utterance), hit@5,
   coverage and word coverage of the transcription, duplicate rate, the transcription's own duplicate rate and
   the excess over it, adjacent repeats; for CIF also mean K, mean target and count error |K - target| with
   the model's own target (``cif.target``: duration, clip_bpe, or spm through ``data.text_vocab``); all of
   them again per K bin (``by_k``).
5. Outputs in ``out_dir``: ``results.json`` (everything: ``retrieval[branch]``, ``text_retrieval[branch]``,
   ``chance.{retrieval,text_retrieval}``, ``keywords``), ``keywords.txt`` (``<utt> <token> ...``),
   ``keywords.jsonl`` (per utterance: tokens, ids, CIF times, neighbours, transcription tokens, target),
   ``plots/cif_<utt>.png`` (CIF weights and fires over the log-mel spectrogram),
   ``plots/retrieval_<branch>.png`` (top-5 images of a few spoken queries, the correct one framed),
   ``plots/text_retrieval_<branch>.png`` (their top-5 texts) and ``plots/keywords_by_k.png`` (keyword metrics per
   K bin); a section of ``RESULTS.md`` (one row per branch and a chance row, for image and for text retrieval,
   and the keyword metrics per K bin) replaced or appended. All writes are atomic.

Unlike the rest of ``eval/`` this module drives a model: it takes a built ``SpeechCLIP`` (loading is the
caller's, see ``speechclip_plus.api``) and uses the API's batch helpers, so scores and API embeddings agree.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..io import atomic_write_text
from .keywords import keyword_metrics
from .report import format_table, write_md_section, write_results_json
from .retrieval import chance_recall, constant_recalls, recall_at_k, top_k_images

log = logging.getLogger(__name__)

KS = (1, 5, 10)
N_NEIGHBOURS = 5
TEXT_DIRECTIONS = ("speech_to_text", "text_to_speech")
TEXT_BRANCHES = ("parallel", "cascaded")  # the branches whose embeddings live in CLIP's text-image space
TEXT_BATCH = 256


# ---------------------------------------------------------------------------------------------- embedding
def length_sorted_batches(durations: Sequence[float], batch_size: int) -> List[List[int]]:
    """Indices in batches of ``batch_size``, longest utterances first (stable), so padding stays small."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(durations)), key=lambda i: (-durations[i], i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def iterate_data_dir(dataset, batch_size: int, progress: bool = True, desc: str = "embed") -> Iterator[Dict]:
    """Collated batches of a ``SpeechImageDataset`` (length-sorted, see ``length_sorted_batches``), each with
    ``index`` (positions in the dataset)."""
    from tqdm import tqdm

    from ..data.dataset import collate

    batches = length_sorted_batches(dataset.durations(), batch_size)
    with tqdm(total=len(dataset), desc=desc, unit="utt", disable=not progress) as bar:
        for idx in batches:
            batch = collate([dataset[i] for i in idx])
            batch["index"] = idx
            yield batch
            bar.update(len(idx))


@dataclass
class Embedded:
    """Model outputs of every utterance of a data dir, in the dataset's (sorted utterance id) order."""

    utts: List[str]
    texts: List[str]
    image_ids: List[str]
    embeddings: Dict[str, torch.Tensor]  # branch -> (N, E), unit norm (combined included for hybrids)
    keywords: List[Optional[Dict[str, Any]]] = field(default_factory=list)  # per utt, cascaded variants


def _cif_target_lengths(model, texts: Sequence[str], spm) -> Optional[torch.Tensor]:
    if spm is None:
        return None
    return torch.tensor([max(1, len(spm.encode(t))) for t in texts])


def load_spm_for(model, cfg: Dict):
    """The sentencepiece model a ``cif.target: spm`` model counts targets with (``data.text_vocab``), else None."""
    if not getattr(model, "has_cif", False) or model.cfg["cif"]["target"] != "spm":
        return None
    path = (cfg.get("data") or {}).get("text_vocab")
    if not path or not os.path.isfile(path):
        log.warning("cif.target=spm but data.text_vocab (%s) is not available: no CIF count error", path)
        return None
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=path)


def embed_data_dir(model, data_dir: str, batch_size: int = 16, device: str = "cpu", spm=None,
                   progress: bool = True) -> Embedded:
    """Run ``model`` (a ``SpeechCLIP`` in eval mode) over every utterance of ``data_dir``.

    Keyword records (cascaded variants) hold ``ids``, ``neighbours`` (K x 5 ids), ``tokens``, CIF ``alpha``
    over the valid frames, ``spans`` (frame spans), ``fires`` (fire frames) and ``target`` (or None).
    """
    from ..api import branch_embedding, eval_forward, keyword_spans
    from ..data.dataset import SpeechImageDataset

    ds = SpeechImageDataset(data_dir)
    n = len(ds)
    if n == 0:
        raise ValueError(f"{data_dir}: no utterances")
    branches = list(model.branches) + (["combined"] if len(model.branches) == 2 else [])
    emb = {b: torch.empty(n, model.clip.embed_dim) for b in branches}
    kws: List[Optional[Dict[str, Any]]] = [None] * n
    beta = float(model.cfg["cif"]["threshold"])
    for batch in iterate_data_dir(ds, batch_size, progress, desc=f"score {os.path.basename(data_dir)}"):
        idx = batch["index"]
        texts = list(batch["text"])
        out = eval_forward(model, batch["wav"].to(device), batch["wav_len"].to(device), texts=texts,
                           target_lengths=_cif_target_lengths(model, texts, spm))
        for b in branches:
            emb[b][idx] = branch_embedding(out, b).cpu()
        if "cascaded" not in out:
            continue
        for row, i in enumerate(idx):
            k = int(out["keyword_lengths"][row])
            ids = [int(t) for t in out["keyword_ids"][row, :k].tolist()]
            rec: Dict[str, Any] = {
                "ids": ids,
                "tokens": model.clip.decode_ids(ids),
                "neighbours": out["keyword_neighbours"][row, :k, :N_NEIGHBOURS].tolist(),
                "target": None,
                "alpha": None, "spans": None, "fires": None,
            }
            if "cif_alpha" in out:
                t_len = int(out["feat_lens"][row])
                alpha = out["cif_alpha"][row, :t_len].float().cpu()
                spans = keyword_spans(alpha, k, t_len, beta)
                total = float(alpha.double().sum())
                rec.update(alpha=alpha.numpy(), spans=spans,
                           fires=[e for j, (_, e) in enumerate(spans) if (j + 1) * beta <= total + 1e-9])
                if "cif_targets" in out:
                    rec["target"] = int(out["cif_targets"][row])
            kws[i] = rec
    image_ids = [ds.utt2img[u] for u in ds.utts]
    return Embedded(list(ds.utts), [ds.text[u] for u in ds.utts], image_ids, emb,
                    kws if "cascaded" in model.branches else [])


# ---------------------------------------------------------------------------------------------- metrics
def image_matrix(image_embeds: Dict[str, np.ndarray], image_ids: Sequence[str], where: str):
    """(the used image ids, sorted; their (M, E) unit-norm embeddings; speech2image (N,) rows into them)."""
    unique = sorted(set(image_ids))
    missing = [i for i in unique if i not in image_embeds]
    if missing:
        raise ValueError(f"{where}: no embedding for {len(missing)} image(s), e.g. {missing[0]} (rerun stage 2)")
    mat = torch.stack([torch.from_numpy(np.array(image_embeds[i], dtype=np.float32).reshape(-1)) for i in unique])
    row = {img: k for k, img in enumerate(unique)}
    return unique, F.normalize(mat, dim=-1), torch.tensor([row[i] for i in image_ids], dtype=torch.long)


def text_matrix(model, texts: Sequence[str], batch_size: int = TEXT_BATCH):
    """(the distinct texts, first spelling of each; their (T, E) unit-norm CLIP text embeddings; speech2text (N,)
    rows into them). Texts are ``normalize_caption``-ed; two are the same when CLIP tokenises them alike."""
    from ..data.vocab import normalize_caption

    clean = [normalize_caption(t) for t in texts]
    tokens = model.clip.tokenizer(clean)
    row: Dict[tuple, int] = {}
    unique: List[str] = []
    speech2text = []
    for text, tok in zip(clean, tokens.tolist()):
        key = tuple(tok)
        if key not in row:
            row[key] = len(unique)
            unique.append(text)
        speech2text.append(row[key])
    with torch.no_grad():
        emb = torch.cat([model.clip.encode_text(unique[s:s + batch_size]).float().cpu()
                         for s in range(0, len(unique), batch_size)])
    return unique, F.normalize(emb, dim=-1), torch.tensor(speech2text, dtype=torch.long)


def transcription_ids(model, texts: Sequence[str]) -> List[List[int]]:
    """CLIP BPE ids of each transcription (``normalize_caption``, open_clip's tokenizer; no SOT/EOT)."""
    from ..data.vocab import normalize_caption

    return model.clip.tokenize_ids([normalize_caption(t) for t in texts])


def keyword_report(model, emb: Embedded, text_ids: Sequence[Sequence[int]]) -> Dict[str, Any]:
    """``keyword_metrics`` over every utterance of ``emb`` against its transcription's ``text_ids``."""
    records = []
    for utt, text, tids, rec in zip(emb.utts, emb.texts, text_ids, emb.keywords):
        r = {"utt": utt, "keywords": rec["ids"], "text_tokens": tids, "words": text.split(),
             "neighbors": rec["neighbours"]}
        if rec["target"] is not None:
            r["target"] = rec["target"]
        records.append(r)
    vocab: Dict[int, str] = {}

    def id_to_token(i: int) -> str:
        if i not in vocab:
            vocab[i] = model.clip.decode_ids([i])[0]
        return vocab[i]

    return keyword_metrics(records, id_to_token, n_neighbors=N_NEIGHBOURS)


# ---------------------------------------------------------------------------------------------- outputs
def _keyword_lines(model, emb: Embedded, text_ids: Sequence[Sequence[int]]) -> Tuple[str, str]:
    """``keywords.txt`` and ``keywords.jsonl`` contents (see the module docstring)."""
    hop = model.upstream.downsample_rate / 16000.0
    txt, jsonl = [], []
    for utt, text, rec, tids in zip(emb.utts, emb.texts, emb.keywords, text_ids):
        txt.append(" ".join([utt] + rec["tokens"]) + "\n")
        kw = []
        for j, (tok, tid, nb) in enumerate(zip(rec["tokens"], rec["ids"], rec["neighbours"])):
            item = {"token": tok, "token_id": tid, "neighbours": model.clip.decode_ids(nb)}
            if rec["spans"] is not None:
                s, e = rec["spans"][j]
                item.update(start=round(s * hop, 4), end=round((e + 1) * hop, 4))
            kw.append(item)
        jsonl.append(json.dumps({"utt": utt, "text": text, "keywords": kw,
                                 "text_tokens": model.clip.decode_ids(tids),
                                 "target": rec["target"]}, ensure_ascii=False) + "\n")
    return "".join(txt), "".join(jsonl)


def _plots(model, emb: Embedded, data_dir: str, out_dir: str, branch: str, images: torch.Tensor,
           image_list: List[str], speech2image: torch.Tensor, num_plots: int) -> List[str]:
    """CIF segmentation and retrieval figures for the first ``num_plots`` utterances; returns the files."""
    from ..data.audio import load_audio
    from ..data.datadir import DataDir
    from .plots import plot_cif_segmentation, plot_retrieval_examples

    written: List[str] = []
    if num_plots <= 0:
        return written
    plot_dir = os.path.join(out_dir, "plots")
    d = DataDir(data_dir)
    picks = list(range(min(num_plots, len(emb.utts))))
    if emb.keywords and emb.keywords[0]["alpha"] is not None:
        rate = 16000.0 / model.upstream.downsample_rate
        for i in picks:
            rec, utt = emb.keywords[i], emb.utts[i]
            path = os.path.join(plot_dir, f"cif_{utt}.png")
            try:
                plot_cif_segmentation(path, load_audio(d.wav[utt]), rec["alpha"], rec["fires"], rec["tokens"],
                                      frame_rate_hz=rate, title=f"{utt}: {emb.texts[i]}")
                written.append(path)
            except (ValueError, OSError) as e:
                log.warning("CIF plot of %s skipped: %s", utt, e)
    k = min(5, images.shape[0])
    _, top = top_k_images(emb.embeddings[branch][picks], images, k=k)
    queries = []
    for row, i in enumerate(picks):
        found = [image_list[j] for j in top[row].tolist()]
        truth = image_list[int(speech2image[i])]
        queries.append((f"{emb.utts[i]}: {emb.texts[i]}", [d.img[j] for j in found],
                        found.index(truth) if truth in found else None))
    path = os.path.join(plot_dir, f"retrieval_{branch}.png")
    try:
        plot_retrieval_examples(path, queries)
        written.append(path)
    except (ValueError, OSError) as e:
        log.warning("retrieval plot skipped: %s", e)
    return written


def _text_plot(emb: Embedded, out_dir: str, branch: str, texts: torch.Tensor, text_list: List[str],
               speech2text: torch.Tensor, num_plots: int) -> List[str]:
    """The top-5 texts of the first ``num_plots`` utterances by ``branch``; returns the file written (or none)."""
    from .plots import plot_text_retrieval_examples

    picks = list(range(min(num_plots, len(emb.utts))))
    if not picks or branch not in emb.embeddings:
        return []
    _, top = top_k_images(emb.embeddings[branch][picks], texts, k=min(5, texts.shape[0]))
    queries = []
    for row, i in enumerate(picks):
        found = top[row].tolist()
        truth = int(speech2text[i])
        queries.append((f"{emb.utts[i]}: {emb.texts[i]}", [text_list[j] for j in found],
                        found.index(truth) if truth in found else None))
    path = os.path.join(out_dir, "plots", f"text_retrieval_{branch}.png")
    try:
        plot_text_retrieval_examples(path, queries, title=f"{branch} branch: top texts of spoken queries "
                                                          "(zero-shot, CLIP text embeddings)")
    except (ValueError, OSError) as e:
        log.warning("text retrieval plot skipped: %s", e)
        return []
    return [path]


RETRIEVAL_COLUMNS = [
    ("branch", "branch", "text"),
    ("speech_to_image_r1", "S→I R@1"), ("speech_to_image_r5", "S→I R@5"), ("speech_to_image_r10", "S→I R@10"),
    ("image_to_speech_r1", "I→S R@1"), ("image_to_speech_r5", "I→S R@5"), ("image_to_speech_r10", "I→S R@10"),
]
TEXT_COLUMNS = [
    ("branch", "branch", "text"),
    ("speech_to_text_r1", "S→T R@1"), ("speech_to_text_r5", "S→T R@5"), ("speech_to_text_r10", "S→T R@10"),
    ("text_to_speech_r1", "T→S R@1"), ("text_to_speech_r5", "T→S R@5"), ("text_to_speech_r10", "T→S R@10"),
]
CHANCE_ROW = "chance"  # the row of a table holding the chance level of each recall (random scores)
KEYWORD_COLUMNS = [
    ("subword_hit_rate", "kw subword hit"), (f"subword_hit_rate_at{N_NEIGHBOURS}", f"kw hit@{N_NEIGHBOURS}"),
    ("word_hit_rate", "kw word hit"), ("coverage", "kw cover"), ("word_coverage", "word cover"),
    ("duplicate_rate", "kw dup"), ("excess_duplicate_rate", "excess dup"), ("adjacent_repeat_rate", "adj repeat"),
    ("mean_keywords", "mean K"), ("count_error", "|K-target|"),
]
KEYWORD_BY_K_COLUMNS = [
    ("bin", "K", "text"), ("n_utterances", "utterances"), ("mean_keywords", "mean K"),
    ("subword_hit_rate", "subword hit"), ("word_hit_rate", "word hit"), ("coverage", "cover"),
    ("word_coverage", "word cover"), ("excess_duplicate_rate", "excess dup"), ("adjacent_repeat_rate", "adj repeat"),
]


def results_table(results: Dict[str, Any]) -> str:
    """The Markdown table of a ``results.json`` dict: one row per branch (keyword columns on ``cascaded``)."""
    rows = []
    for branch, metrics in results["retrieval"].items():
        row = {"branch": branch + (" *" if branch == results.get("retrieval_branch") else ""), **metrics}
        if branch == "cascaded" and results.get("keywords"):
            row.update(results["keywords"])
        rows.append(row)
    chance = (results.get("chance") or {}).get("retrieval")
    if chance:
        rows.append({"branch": CHANCE_ROW, **chance})
    cols = list(RETRIEVAL_COLUMNS) + (list(KEYWORD_COLUMNS) if results.get("keywords") else [])
    return format_table(rows, cols)


def keyword_by_k_table(keywords: Dict[str, Any]) -> str:
    """The Markdown table of ``keyword_metrics``' ``by_k``: one row per K bin present."""
    return format_table([{"bin": label, **m} for label, m in keywords["by_k"].items()], KEYWORD_BY_K_COLUMNS)


def _keyword_plot(out_dir: str, label: str, keywords: Dict[str, Any]) -> List[str]:
    """``plots/keywords_by_k.png`` (one series, ``label``); returns the file written, if any."""
    from .plots import plot_keyword_metrics_by_k

    path = os.path.join(out_dir, "plots", "keywords_by_k.png")
    try:
        plot_keyword_metrics_by_k(path, {label: keywords["by_k"]})
    except (ValueError, OSError) as e:
        log.warning("keyword plot skipped: %s", e)
        return []
    return [path]


def text_results_table(results: Dict[str, Any]) -> str:
    """The Markdown table of ``results["text_retrieval"]``: one row per branch and the chance row."""
    rows = [{"branch": branch, **metrics} for branch, metrics in (results.get("text_retrieval") or {}).items()]
    chance = (results.get("chance") or {}).get("text_retrieval")
    if chance:
        rows.append({"branch": CHANCE_ROW, **chance})
    return format_table(rows, TEXT_COLUMNS)


def score(model, data_dir: str, image_embeds: str, out_dir: str, exp_dir: Optional[str] = None,
          cfg: Optional[Dict] = None, label: str = "", meta: Optional[Dict] = None, batch_size: int = 16,
          num_plots: int = 4, device: str = "cpu", progress: bool = True) -> Dict[str, Any]:
    """Score ``model`` on ``data_dir`` (steps in the module docstring); returns the ``results.json`` dict.

    ``label`` names the model in ``RESULTS.md`` (e.g. ``best.pt step 2000``); the section title is
    ``<data set>: <label>``, and rescoring replaces that section.
    """
    from ..data.image_cache import load_image_embeddings

    cfg = cfg or {"model": model.cfg}
    model.eval()
    emb = embed_data_dir(model, data_dir, batch_size, device, load_spm_for(model, cfg), progress)
    image_list, images, s2i = image_matrix(load_image_embeddings(image_embeds), emb.image_ids, image_embeds)
    if images.shape[1] != model.clip.embed_dim:
        raise ValueError(f"{image_embeds}: image embeddings have dim {images.shape[1]}, the model's CLIP has "
                         f"{model.clip.embed_dim} (computed with another CLIP?)")
    retrieval = {b: recall_at_k(e, images, s2i, ks=KS) for b, e in emb.embeddings.items()}
    text_list, texts, s2t = text_matrix(model, emb.texts)
    text_retrieval = {b: recall_at_k(emb.embeddings[b], texts, s2t, ks=KS, names=TEXT_DIRECTIONS)
                      for b in TEXT_BRANCHES if b in emb.embeddings}
    chance = {"retrieval": chance_recall(s2i, KS), "text_retrieval": chance_recall(s2t, KS, TEXT_DIRECTIONS)}
    fixed = constant_recalls(s2i, KS) + constant_recalls(s2t, KS, TEXT_DIRECTIONS)
    if fixed:
        log.warning("%s: %s are 1.0 for any model (%d images, %d distinct texts, %d utterances: too few "
                    "candidates); read every recall against the chance row", data_dir, ", ".join(fixed),
                    len(image_list), len(text_list), len(emb.utts))
    text_ids = transcription_ids(model, emb.texts) if emb.keywords else []
    kw_metrics = keyword_report(model, emb, text_ids) if emb.keywords else None
    set_name = os.path.basename(os.path.normpath(data_dir))
    results: Dict[str, Any] = {
        "data_dir": os.path.abspath(data_dir),
        "set": set_name,
        "image_embeds": os.path.abspath(image_embeds),
        "model": dict(meta or {}),
        "variant": model.variant,
        "retrieval_branch": model.retrieval_branch,
        "n_utterances": len(emb.utts),
        "n_images": len(image_list),
        "n_texts": len(text_list),
        "retrieval": retrieval,
        "text_retrieval": text_retrieval,
        "chance": chance,
        "keywords": kw_metrics,
    }
    os.makedirs(out_dir, exist_ok=True)
    if emb.keywords:
        txt, jsonl = _keyword_lines(model, emb, text_ids)
        atomic_write_text(os.path.join(out_dir, "keywords.txt"), txt)
        atomic_write_text(os.path.join(out_dir, "keywords.jsonl"), jsonl)
    text_branch = "parallel" if "parallel" in text_retrieval else "cascaded"
    plots = (_plots(model, emb, data_dir, out_dir, model.retrieval_branch, images, image_list, s2i, num_plots)
             + _text_plot(emb, out_dir, text_branch, texts, text_list, s2t, num_plots))
    if kw_metrics and num_plots > 0:
        plots += _keyword_plot(out_dir, f"{model.variant} cascaded", kw_metrics)
    results["plots"] = [os.path.relpath(p, out_dir) for p in plots]
    write_results_json(os.path.join(out_dir, "results.json"), results)
    if exp_dir is not None:
        title = f"{set_name}: {label}" if label else set_name
        note = (f"Variant `{model.variant}`, {len(emb.utts)} utterances, {len(image_list)} images; recall and "
                f"keyword rates in %. `*` = the model's retrieval branch; `{CHANCE_ROW}` = the expected recall of "
                f"random scores. Details: `{os.path.relpath(os.path.join(out_dir, 'results.json'), exp_dir)}`.")
        text_note = (f"Zero-shot speech↔text retrieval against the CLIP text embeddings of the {len(text_list)} "
                     "distinct transcriptions (no speech-text pairs in training): `parallel` is SpeechCLIP's "
                     "zero-shot number, `cascaded` is CLIP's text tower on the keywords.")
        body = note + "\n\n" + results_table(results)
        if kw_metrics:
            body += ("\nKeyword metrics of the cascaded branch by keyword count K (`by_k` in results.json; "
                     "rates in %):\n\n" + keyword_by_k_table(kw_metrics))
        if text_retrieval:
            body += "\n" + text_note + "\n\n" + text_results_table(results)
        write_md_section(os.path.join(exp_dir, "RESULTS.md"), title, body)
    return results

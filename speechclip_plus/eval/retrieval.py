"""Image <-> speech (and speech <-> text) retrieval recall, computed in chunks; chance levels.

Contract
- ``speech`` (N, D) and ``images`` (M, D) are embeddings the caller has already L2-normalised; the score of a
  pair is their dot product (= cosine for unit vectors). Nothing is normalised here. Any embeddings work:
  score each branch of a hybrid model with its own call.
- ``speech2image`` (N,) holds, for each utterance, the row of its image in ``images``. Every image must have
  at least one utterance (an image query without a correct answer is undefined).
- Speech -> image: the query is an utterance, the one positive is its image.
  Image -> speech: the query is an image, its positives are all its utterances, and the score of the
  positive side is the best one: ``p_m = max_{n: s2i[n] = m} S[n, m]``.
- Rank (0-based) of a query = number of *negatives* that score at least as high as its positive
  (``ties="pessimistic"``, the default): ``rank = #{negatives j : S_j >= p}``. A tie therefore counts against
  the query, so a collapsed model whose embeddings are all equal gets recall 0, not 1.
  ``ties="optimistic"`` counts only strictly greater negatives (``S_j > p``): ties go the query's way.
  Ties are exact equality of the computed float scores (two equal real scores may come out unequal after
  rounding, so duplicate vectors tie reliably only when their products are exact).
- Hit@k = ``rank < k``; R@k = mean of hits over the queries, a fraction in [0, 1]
  (speech -> image over N utterances, image -> speech over M images); ``recall_mean_k`` = the mean of the two
  directions.

The same code scores any "many queries, one positive each / few queries, several positives each" pair of
sets: with ``names=("speech_to_text", "text_to_speech")`` the candidates are caption texts instead of images
(``eval.scoring``: zero-shot speech <-> text through CLIP's text tower).

Chance level (``chance_recall``): the expected R@k of scores that order the candidates uniformly at random
(no ties). Speech -> image: ``min(k, M) / M``. Image -> speech, for an image with c of the N utterances:
``1 - C(N - c, k) / C(N, k)`` (the chance that a random top k holds one of its c), averaged over the images.
An R@k whose chance level is 1 is 1 for every model (too few candidates: ``M <= k``, or every image has at
most k - 1 negatives): ``constant_recalls`` lists them and ``selection_warning`` says when the metric that
picks the best checkpoint (``train.select_metric``) is one of them.

Cost: one (N, M, D) matrix product in total, done as ``images @ speech[chunk].T``, so only a (M, chunk) block
of scores exists at a time. ``chunk_size=None`` picks ``BLOCK_SCORES // M`` utterances, so a block holds about
2**24 scores (64 MiB in float32; the peak extra memory is about 2.5 times that, plus O(M x max_k x MERGE_EVERY)).
Large blocks matter for speed: the per-image top-k has a fixed cost per row and call. Both directions come
from the same blocks, hence from the same float values: speech -> image counts down its column;
image -> speech keeps, per image, the best positive and the ``max(ks)`` best negative scores seen so far,
which is enough to tell whether its rank is below max(ks). No full sort is needed.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

TIES = ("pessimistic", "optimistic")
BLOCK_SCORES = 1 << 24  # scores per block when chunk_size is None
MERGE_EVERY = 32  # chunks of per-image top negatives kept before merging

IndexLike = Union[torch.Tensor, Sequence[int]]


def _check_inputs(speech: torch.Tensor, images: torch.Tensor, speech2image: Optional[IndexLike]
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Validate; return both embeddings in one float dtype (>= float32) on speech's device, and the indices."""
    for name, x in (("speech", speech), ("images", images)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor (rows, dim), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"{name}: no rows")
        # One pass: a row sum is finite unless the row holds NaN/inf (or values near the float limit).
        if not bool(torch.isfinite(x.sum(dim=1, dtype=torch.promote_types(x.dtype, torch.float32))).all()):
            raise ValueError(f"{name}: contains NaN or infinite values (or values too large to score)")
    if speech.shape[1] != images.shape[1]:
        raise ValueError(f"speech has dim {speech.shape[1]} but images have dim {images.shape[1]}")
    dtype = torch.promote_types(speech.dtype, images.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    speech, images = speech.to(dtype), images.to(device=speech.device, dtype=dtype)
    if speech2image is None:
        return speech, images, None
    s2i = torch.as_tensor(speech2image)
    if s2i.dim() != 1 or s2i.shape[0] != speech.shape[0]:
        raise ValueError(f"speech2image: expected shape ({speech.shape[0]},), got {tuple(s2i.shape)}")
    if s2i.is_floating_point() or s2i.is_complex() or s2i.dtype == torch.bool:
        raise ValueError(f"speech2image: expected integer image indices, got {s2i.dtype}")
    s2i = s2i.to(device=speech.device, dtype=torch.long)
    n_img = images.shape[0]
    bad = ((s2i < 0) | (s2i >= n_img)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"speech2image[{i}] = {int(s2i[i])} is not a row of images (0..{n_img - 1})")
    return speech, images, s2i


def _chunk(chunk_size: Optional[int], n_img: int) -> int:
    if chunk_size is None:
        return max(1, BLOCK_SCORES // n_img)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    return chunk_size


def _merge(tops, max_rank: int) -> torch.Tensor:
    return torch.cat(tops, dim=1).topk(max_rank, dim=1, sorted=False).values


def retrieval_ranks(speech: torch.Tensor, images: torch.Tensor, speech2image: IndexLike, max_rank: int,
                    chunk_size: Optional[int] = None, ties: str = "pessimistic"
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the positives, capped: returns ``(speech_rank (N,), image_rank (M,))``, each
    ``min(rank, max_rank)`` with rank as defined in the module docstring. Enough for any R@k with k <= max_rank.
    """
    if ties not in TIES:
        raise ValueError(f"ties: expected one of {TIES}, got {ties!r}")
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank: expected a positive int, got {max_rank!r}")
    speech, images, s2i = _check_inputs(speech, images, speech2image)
    chunk_size = _chunk(chunk_size, images.shape[0])
    n_speech, n_img = speech.shape[0], images.shape[0]
    n_caps = torch.bincount(s2i, minlength=n_img)
    lonely = (n_caps == 0).nonzero().flatten()
    if lonely.numel():
        raise ValueError(f"{lonely.numel()} image(s) have no utterance in speech2image, e.g. image row "
                         f"{int(lonely[0])}; pass only the images the utterances refer to")
    ge = torch.ge if ties == "pessimistic" else torch.gt
    device, dtype = speech.device, speech.dtype
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)

    speech_rank = torch.empty(n_speech, dtype=torch.long, device=device)
    best_pos = torch.full((n_img,), float("-inf"), dtype=dtype, device=device)  # p_m
    # Best negatives per image: each chunk's top max_rank, merged every MERGE_EVERY chunks.
    tops = [torch.full((n_img, max_rank), float("-inf"), dtype=dtype, device=device)]
    with torch.no_grad():
        for start in range(0, n_speech, chunk_size):
            stop = min(start + chunk_size, n_speech)
            cols = torch.arange(stop - start, device=device)
            rows = s2i[start:stop]
            block = images @ speech[start:stop].T  # (M, c): column j = scores of utterance start + j
            pos = block[rows, cols]  # (c,)
            # speech -> image: negatives beating the positive; the positive itself is excluded by -1 (>=) or
            # never counted (>).
            beat = ge(block, pos.unsqueeze(0)).sum(0, dtype=torch.int32)  # int32: much faster than the default
            speech_rank[start:stop] = beat - 1 if ties == "pessimistic" else beat
            # image -> speech: fold the positives into p_m, then drop them and keep the best negatives.
            best_pos.scatter_reduce_(0, rows, pos, reduce="amax")
            block[rows, cols] = neg_inf
            k = min(max_rank, block.shape[1])
            tops.append(block.topk(k, dim=1, sorted=False).values)
            del block
            if len(tops) > MERGE_EVERY:
                tops = [_merge(tops, max_rank)]
    top_neg = _merge(tops, max_rank)
    # Fewer than max_rank negatives beat p_m iff all of them are among the max_rank best negatives.
    image_rank = ge(top_neg, best_pos.unsqueeze(1)).sum(1)
    return speech_rank.clamp_(max=max_rank), image_rank


DIRECTIONS = ("speech_to_image", "image_to_speech")


def _check_ks(ks: Sequence[int]) -> List[int]:
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks: expected positive ints, got {ks!r}")
    return ks


def recall_at_k(speech: torch.Tensor, images: torch.Tensor, speech2image: IndexLike,
                ks: Sequence[int] = (1, 5, 10), chunk_size: Optional[int] = None,
                ties: str = "pessimistic", names: Tuple[str, str] = DIRECTIONS) -> Dict[str, float]:
    """Recall@k both ways as fractions in [0, 1] (definitions and tie rule in the module docstring).

    Returns ``<names[0]>_r{k}``, ``<names[1]>_r{k}`` (by default ``speech_to_image_r{k}``,
    ``image_to_speech_r{k}``) and ``recall_mean_{k}`` for every k in ``ks``.
    """
    ks = _check_ks(ks)
    speech_rank, image_rank = retrieval_ranks(speech, images, speech2image, max(ks), chunk_size, ties)
    out: Dict[str, float] = {}
    for k in ks:
        s2i = (speech_rank < k).double().mean().item()
        i2s = (image_rank < k).double().mean().item()
        out[f"{names[0]}_r{k}"] = s2i
        out[f"{names[1]}_r{k}"] = i2s
        out[f"recall_mean_{k}"] = (s2i + i2s) / 2
    return out


def chance_recall(speech2image: IndexLike, ks: Sequence[int] = (1, 5, 10),
                  names: Tuple[str, str] = DIRECTIONS) -> Dict[str, float]:
    """Expected recall@k of random scores (formulas in the module docstring), keyed as ``recall_at_k``.

    ``speech2image`` (N,) as for ``recall_at_k``; the candidates are the images it refers to (every row
    ``0..max`` must have at least one utterance).
    """
    ks = _check_ks(ks)
    s2i = torch.as_tensor(speech2image).long().reshape(-1)
    if s2i.numel() == 0 or int(s2i.min()) < 0:
        raise ValueError("speech2image: expected a non-empty 1-D index tensor with values >= 0")
    counts = torch.bincount(s2i).tolist()
    if 0 in counts:
        raise ValueError(f"speech2image: image row {counts.index(0)} has no utterance")
    n, m = len(s2i), len(counts)
    out: Dict[str, float] = {}
    for k in ks:
        a = min(k, m) / m
        b = sum(1.0 - math.comb(n - c, k) / math.comb(n, k) for c in counts) / m if k <= n else 1.0
        out[f"{names[0]}_r{k}"] = a
        out[f"{names[1]}_r{k}"] = b
        out[f"recall_mean_{k}"] = (a + b) / 2
    return out


def constant_recalls(speech2image: IndexLike, ks: Sequence[int] = (1, 5, 10),
                     names: Tuple[str, str] = DIRECTIONS) -> List[str]:
    """Names of the recalls that are 1 for any scores (chance level 1: too few candidates)."""
    return [key for key, value in chance_recall(speech2image, ks, names).items() if value >= 1.0]


def selection_warning(speech2image: IndexLike, select_metric: str, where: str) -> Optional[str]:
    """A warning when ``select_metric`` (``train.select_metric``, optionally ``<branch>/``-prefixed) is a recall
    that ``where`` (the validation set) cannot move: it is 1 whatever the model, so it cannot rank checkpoints.
    None otherwise (other metrics, or a recall with room to vary)."""
    metric = select_metric.split("/")[-1]
    fixed = constant_recalls(speech2image)
    if metric not in fixed:
        return None
    n_images = int(torch.as_tensor(speech2image).max()) + 1
    return (f"{where}: {metric} is 1.0 for any model ({n_images} images, {len(torch.as_tensor(speech2image))} "
            f"utterances: too few candidates), so train.select_metric={select_metric} cannot tell checkpoints "
            f"apart and best.pt is simply the first validation; use a larger valid set or another "
            f"train.select_metric (e.g. recall_mean_1, or loss). Recalls fixed at 1 here: {', '.join(fixed)}")


def top_k_images(speech: torch.Tensor, images: torch.Tensor, k: int = 5, chunk_size: Optional[int] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best-scoring images of each utterance: ``(scores (N, k), indices (N, k))``, best first; equal
    scores keep the lower image index first (stable sort). Sorts whole rows: meant for a few queries (plots).
    """
    speech, images, _ = _check_inputs(speech, images, None)
    if not isinstance(k, int) or not 1 <= k <= images.shape[0]:
        raise ValueError(f"k: expected an int in 1..{images.shape[0]} (number of images), got {k!r}")
    chunk_size = _chunk(chunk_size, images.shape[0])
    scores, indices = [], []
    with torch.no_grad():
        for start in range(0, speech.shape[0], chunk_size):
            block = speech[start:start + chunk_size] @ images.T
            val, idx = torch.sort(block, dim=1, descending=True, stable=True)
            scores.append(val[:, :k])
            indices.append(idx[:, :k])
    return torch.cat(scores), torch.cat(indices)

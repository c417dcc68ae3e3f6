"""Keyword metrics for the cascaded branches.

The published keyword metrics were never released, so **these definitions are ours**.

An utterance's keywords are the CLIP token ids (original, not reduced-vocabulary ids) that the quantiser picks
for its K keyword slots, k_1 .. k_K: K = 8 for the fixed-CLS branch (``c``), K = K_b, the CIF count, for ``c+``.
They are compared with the CLIP BPE tokenisation of the utterance's transcription, t_1 .. t_T, with SOT, EOT and
padding excluded. Token strings are CLIP vocabulary entries, where a word-final token ends with ``</w>``
(``dog</w>``); a *whole-word keyword* is one whose token ends with ``</w>``, and its word is the token without
``</w>``. W is the set of the transcription's normalised words (``normalize_words``).

Pooled over all keywords of all utterances (denominator: the number of keywords, sum of K):
- ``subword_hit_rate``: keywords whose token id occurs among the transcription's token ids.
- ``subword_hit_rate_at5``: keywords for which any of their 5 nearest tokens (given by the caller, usually by
  cosine to the keyword vector) occurs among the transcription's token ids. Reported only when every
  utterance comes with neighbours.
- ``word_hit_rate``: whole-word keywords whose word is in W.
- ``word_token_rate``: whole-word keywords (the ceiling of ``word_hit_rate``).
- ``adjacent_repeat_rate``: keywords k_j, j >= 2, equal to k_(j-1) (the CIF failure of firing one token
  several times in a row). The denominator is every keyword, not every adjacent pair, so it reads on the same
  pool as the hit rates ("a third of the keywords repeat the previous one"); the first keyword of an
  utterance is never a repeat, so an utterance reaches at most (K - 1) / K.

Means over utterances, each over the utterances where it is defined (the others are left out of that mean):
- ``subword_hit_rate_utt``, ``word_hit_rate_utt``: an utterance's subword / word hits over its K; K >= 1.
- ``duplicate_rate``: 1 - distinct(k) / K; K >= 1.
- ``text_duplicate_rate``: 1 - distinct(t) / T, the same rate on the transcription's own tokens (captions
  repeat "a", "the"); K >= 1 and T >= 1.
- ``excess_duplicate_rate``: keyword minus transcription duplicate rate of each utterance; K >= 1 and T >= 1,
  so it equals ``duplicate_rate - text_duplicate_rate`` unless an utterance with keywords has an empty
  transcription. Keywords that are exactly the transcription's tokens score 0; it is negative when the
  keywords repeat less than the caption (8 distinct keywords for a 12-token caption that repeats "a").
- ``coverage``: |distinct(k) ∩ distinct(t)| / |distinct(t)|, the share of the transcription's distinct tokens
  that some keyword equals; T >= 1 (an utterance with K = 0 covers 0).
- ``word_coverage``: the share of W that is the word of some whole-word keyword; W not empty.
- ``mean_keywords``: mean K; ``mean_text_tokens``: mean T (all utterances).
- ``mean_target`` and ``count_error`` (mean ``|K - target|``): when every utterance has a target count (CIF).
- ``n_utterances``, ``n_keywords``: the sizes behind these numbers.

``by_k``: the same metrics (with their ``n_utterances`` and ``n_keywords``) over the utterances whose K falls in
each bin of ``K_BINS``: "0", "1-4", "5-8", "9-12", "13-16", "17+"; only bins holding utterances appear. Bins of
4 put ``c``'s fixed K = 8 at the top of "5-8", so ``c+`` utterances with up to 8 keywords compare with ``c``
directly, and the higher bins show how a metric moves as CIF emits more keywords; "0" keeps the utterances on
which CIF fired nothing visible.

Rates are fractions in [0, 1] (``excess_duplicate_rate`` in [-1, 1]); a rate with an empty denominator (no
keywords, no utterance where it is defined) is NaN.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

WORD_END = "</w>"
_WORD_RE = re.compile(r"[^\W\d_]+|\d")

TokenLookup = Union[Mapping[int, str], Callable[[int], str]]

# (label, lowest K, highest K or None for no limit); see the module docstring for the choice
K_BINS: Tuple[Tuple[str, int, Optional[int]], ...] = (
    ("0", 0, 0), ("1-4", 1, 4), ("5-8", 5, 8), ("9-12", 9, 12), ("13-16", 13, 16), ("17+", 17, None))


def normalize_words(text: str) -> List[str]:
    """Lower-case words of ``text`` as CLIP's pre-tokeniser splits it: maximal runs of letters, and single
    digits; punctuation, apostrophes and other symbols are dropped (so "The dog's T-shirt, 12" gives
    ``["the", "dog", "s", "t", "shirt", "1", "2"]``)."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_words: expected str, got {type(text).__name__}")
    return _WORD_RE.findall(text.lower())


@dataclass(frozen=True)
class KeywordRecord:
    """One utterance's keywords and transcription (see the module docstring for each field's meaning)."""

    keywords: Sequence[int]  # CLIP token id of each keyword slot (length K)
    text_tokens: Sequence[int]  # CLIP BPE ids of the transcription, SOT/EOT/pad excluded
    words: Sequence[str]  # the transcription's words (normalised again here, so raw words are fine)
    neighbors: Optional[Sequence[Sequence[int]]] = None  # per keyword, its nearest token ids, nearest first
    target: Optional[float] = None  # CIF target count
    utt: str = ""  # utterance id, used in error messages


_FIELDS = {f.name for f in fields(KeywordRecord)}


def _as_record(rec: Union[KeywordRecord, Mapping[str, Any]], i: int) -> KeywordRecord:
    if isinstance(rec, KeywordRecord):
        return rec
    if not isinstance(rec, Mapping):
        raise TypeError(f"record {i}: expected a KeywordRecord or a mapping, got {type(rec).__name__}")
    unknown = set(rec) - _FIELDS
    if unknown:
        raise ValueError(f"record {i}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(_FIELDS)}")
    missing = {"keywords", "text_tokens", "words"} - set(rec)
    if missing:
        raise ValueError(f"record {i}: missing key(s) {sorted(missing)}")
    return KeywordRecord(**rec)


def _lookup(id_to_token: TokenLookup) -> Callable[[int], str]:
    if isinstance(id_to_token, Mapping):
        def get(tok: int) -> str:
            try:
                return id_to_token[tok]
            except KeyError:
                raise KeyError(f"token id {tok} is not in the id -> token mapping") from None
        return get
    if callable(id_to_token):
        return id_to_token
    raise TypeError(f"id_to_token: expected a mapping or a callable, got {type(id_to_token).__name__}")


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def k_bin(k: int) -> str:
    """The label of the ``K_BINS`` bin holding keyword count ``k`` (>= 0)."""
    for label, lo, hi in K_BINS:
        if k >= lo and (hi is None or k <= hi):
            return label
    raise ValueError(f"keyword count must be >= 0, got {k}")


@dataclass(frozen=True)
class _Counts:
    """What one utterance contributes to every metric (names as in the module docstring)."""

    k: int
    n_text: int  # T
    distinct: int  # distinct keywords
    text_distinct: int  # distinct transcription tokens
    subword_hits: int
    neighbour_hits: int
    word_tokens: int
    word_hits: int
    adjacent_repeats: int
    covered_tokens: int  # distinct transcription tokens that some keyword equals
    words: int  # |W|
    covered_words: int  # words of W that some whole-word keyword equals
    target: Optional[float]


def _count(r: KeywordRecord, where: str, name: Callable[[int], str], n_neighbors: int) -> _Counts:
    kws = [int(k) for k in r.keywords]
    text_ids = [int(t) for t in r.text_tokens]
    text = set(text_ids)
    words = set(normalize_words(" ".join(r.words)))
    kw_words = set()
    word_tokens = word_hits = 0
    for kw in kws:
        try:
            tok = name(kw)
        except KeyError as e:
            raise KeyError(f"{where}: {e.args[0]}") from None
        if tok.endswith(WORD_END):
            word = tok[: -len(WORD_END)]
            kw_words.add(word)
            word_tokens += 1
            word_hits += word in words
    nb_hits = 0
    if r.neighbors is not None:
        if len(r.neighbors) != len(kws):
            raise ValueError(f"{where}: {len(r.neighbors)} neighbour lists for {len(kws)} keywords")
        for j, nb in enumerate(r.neighbors):
            if len(nb) < n_neighbors:
                raise ValueError(f"{where}: keyword {j} has {len(nb)} neighbours, need {n_neighbors}")
            nb_hits += any(int(t) in text for t in list(nb)[:n_neighbors])
    return _Counts(k=len(kws), n_text=len(text_ids), distinct=len(set(kws)), text_distinct=len(text),
                   subword_hits=sum(kw in text for kw in kws), neighbour_hits=nb_hits, word_tokens=word_tokens,
                   word_hits=word_hits, adjacent_repeats=sum(a == b for a, b in zip(kws, kws[1:])),
                   covered_tokens=len(text.intersection(kws)), words=len(words),
                   covered_words=len(words & kw_words), target=None if r.target is None else float(r.target))


def _aggregate(counts: Sequence[_Counts], hit_at: Optional[str], with_target: bool) -> Dict[str, float]:
    """The metrics of the module docstring over ``counts`` (``hit_at``: the hit@n key, None without
    neighbours)."""
    n_kw = sum(c.k for c in counts)

    def pooled(attr: str) -> float:
        return sum(getattr(c, attr) for c in counts) / n_kw if n_kw else math.nan

    def dup(distinct: int, n: int) -> float:
        return 1.0 - distinct / n

    spoken = [c for c in counts if c.k]  # K >= 1
    paired = [c for c in spoken if c.n_text]  # K >= 1 and T >= 1
    out: Dict[str, float] = {"n_utterances": len(counts), "n_keywords": n_kw,
                             "subword_hit_rate": pooled("subword_hits")}
    if hit_at is not None:
        out[hit_at] = pooled("neighbour_hits")
    out.update(word_hit_rate=pooled("word_hits"), word_token_rate=pooled("word_tokens"),
               duplicate_rate=_mean([dup(c.distinct, c.k) for c in spoken]),
               mean_keywords=_mean([c.k for c in counts]), mean_text_tokens=_mean([c.n_text for c in counts]))
    if with_target:
        out.update(mean_target=_mean([c.target for c in counts]),
                   count_error=_mean([abs(c.k - c.target) for c in counts]))
    out.update(
        text_duplicate_rate=_mean([dup(c.text_distinct, c.n_text) for c in paired]),
        excess_duplicate_rate=_mean([dup(c.distinct, c.k) - dup(c.text_distinct, c.n_text) for c in paired]),
        coverage=_mean([c.covered_tokens / c.text_distinct for c in counts if c.n_text]),
        word_coverage=_mean([c.covered_words / c.words for c in counts if c.words]),
        adjacent_repeat_rate=pooled("adjacent_repeats"),
        subword_hit_rate_utt=_mean([c.subword_hits / c.k for c in spoken]),
        word_hit_rate_utt=_mean([c.word_hits / c.k for c in spoken]),
    )
    return out


def keyword_metrics(records: Iterable[Union[KeywordRecord, Mapping[str, Any]]], id_to_token: TokenLookup,
                    n_neighbors: int = 5) -> Dict[str, Any]:
    """Keyword metrics over ``records`` (one per utterance), as defined in the module docstring, with their
    ``by_k`` breakdown.

    ``id_to_token`` maps a CLIP token id to its vocabulary string (a dict or a function). ``n_neighbors``: how
    many of each keyword's neighbours count for the hit@n rate (key ``subword_hit_rate_at{n}``).
    """
    name = _lookup(id_to_token)
    recs = [_as_record(r, i) for i, r in enumerate(records)]
    if not recs:
        raise ValueError("keyword_metrics: no records")
    with_nb = [r.neighbors is not None for r in recs]
    with_target = [r.target is not None for r in recs]
    for flags, what in ((with_nb, "neighbors"), (with_target, "target")):
        if any(flags) and not all(flags):
            i = flags.index(False)
            raise ValueError(f"record {i} ({recs[i].utt or 'no id'}): has no {what} but other records do; "
                             f"give {what} for all records or none")
    counts = [_count(r, f"record {i} ({r.utt or 'no id'})", name, n_neighbors) for i, r in enumerate(recs)]
    hit_at = f"subword_hit_rate_at{n_neighbors}" if all(with_nb) else None
    out: Dict[str, Any] = _aggregate(counts, hit_at, all(with_target))
    out["by_k"] = {}
    for label, _, _ in K_BINS:
        members = [c for c in counts if k_bin(c.k) == label]
        if members:
            out["by_k"][label] = _aggregate(members, hit_at, all(with_target))
    return out

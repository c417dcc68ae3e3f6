"""Keyword metrics for the cascaded branches.

The published keyword metrics were never released, so **these definitions are ours**.

An utterance's keywords are the CLIP token ids (original, not reduced-vocabulary ids) that the quantiser picks
for its K keyword slots: K = 8 for the fixed-CLS branch (``c``), K = K_b, the CIF count, for ``c+``. They are
compared with the CLIP BPE tokenisation of the utterance's transcription, with SOT, EOT and padding excluded.
Token strings are CLIP vocabulary entries, where a word-final token ends with ``</w>`` (``dog</w>``).
Counts are pooled over utterances unless a metric says "mean over utterances".

- ``subword_hit_rate``: share of all keywords whose token id occurs among the transcription's token ids.
- ``subword_hit_rate_at5``: share of all keywords for which any of the keyword's 5 nearest tokens (given by the
  caller, usually by cosine to the keyword vector) occurs among the transcription's token ids. Reported only
  when every utterance comes with neighbours.
- ``word_hit_rate``: share of all keywords whose token is a whole word (ends with ``</w>``) and whose text
  without ``</w>`` equals a word of the normalised transcription (see ``normalize_words``).
- ``word_token_rate``: share of all keywords whose token is a whole word (the ceiling of ``word_hit_rate``).
- ``duplicate_rate``: mean over utterances of ``1 - distinct(keywords) / K``; utterances with K = 0 are left
  out of this mean.
- ``mean_keywords``: mean K; ``mean_text_tokens``: mean transcription token count.
- ``mean_target`` and ``count_error`` (mean ``|K - target|``): when every utterance has a target count (CIF).
- ``n_utterances``, ``n_keywords``: the sizes behind these numbers.

Rates are fractions in [0, 1]; a rate over zero keywords is NaN.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

WORD_END = "</w>"
_WORD_RE = re.compile(r"[^\W\d_]+|\d")

TokenLookup = Union[Mapping[int, str], Callable[[int], str]]


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


def keyword_metrics(records: Iterable[Union[KeywordRecord, Mapping[str, Any]]], id_to_token: TokenLookup,
                    n_neighbors: int = 5) -> Dict[str, float]:
    """Keyword metrics over ``records`` (one per utterance), as defined in the module docstring.

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

    n_kw = sub_hits = nb_hits = word_hits = word_tokens = 0
    dup, n_keys, n_text, count_err, targets = [], [], [], [], []
    for i, r in enumerate(recs):
        where = f"record {i} ({r.utt or 'no id'})"
        kws = [int(k) for k in r.keywords]
        text = {int(t) for t in r.text_tokens}
        words = set(normalize_words(" ".join(r.words)))
        k = len(kws)
        n_kw += k
        n_keys.append(k)
        n_text.append(len(r.text_tokens))
        if k:
            dup.append(1.0 - len(set(kws)) / k)
        sub_hits += sum(kw in text for kw in kws)
        for kw in kws:
            try:
                tok = name(kw)
            except KeyError as e:
                raise KeyError(f"{where}: {e.args[0]}") from None
            if tok.endswith(WORD_END):
                word_tokens += 1
                word_hits += tok[: -len(WORD_END)] in words
        if r.neighbors is not None:
            if len(r.neighbors) != k:
                raise ValueError(f"{where}: {len(r.neighbors)} neighbour lists for {k} keywords")
            for j, nb in enumerate(r.neighbors):
                if len(nb) < n_neighbors:
                    raise ValueError(f"{where}: keyword {j} has {len(nb)} neighbours, need {n_neighbors}")
                nb_hits += any(int(t) in text for t in list(nb)[:n_neighbors])
        if r.target is not None:
            targets.append(float(r.target))
            count_err.append(abs(k - float(r.target)))

    def rate(hits: int) -> float:
        return hits / n_kw if n_kw else math.nan

    out: Dict[str, float] = {"n_utterances": len(recs), "n_keywords": n_kw, "subword_hit_rate": rate(sub_hits)}
    if all(with_nb):
        out[f"subword_hit_rate_at{n_neighbors}"] = rate(nb_hits)
    out.update(word_hit_rate=rate(word_hits), word_token_rate=rate(word_tokens), duplicate_rate=_mean(dup),
               mean_keywords=_mean(n_keys), mean_text_tokens=_mean(n_text))
    if all(with_target):
        out.update(mean_target=_mean(targets), count_error=_mean(count_err))
    return out

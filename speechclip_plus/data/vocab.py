"""Stage 3 vocabularies: CLIP-subword usage counts (the keyword codebook) and a sentencepiece model.

Usage counts: each caption is normalised (``normalize_caption``), tokenised with open_clip's BPE
``SimpleTokenizer`` (lower-casing and whitespace clean-up included) and wrapped in SOT ... EOT; every token
occurrence is counted, so SOT and EOT count once per caption. A caption longer than the 77-token context is
an error (never truncated). Tokens are ordered by count descending, then id ascending.

Difference from the reference (``avssl/data/flickr_stat/stat_textCLIP_input.py`` of atosystem/SpeechCLIP and
ShampooWang/SpeechCLIP_plus, which made ``text_clip_vocab_usage_byfreq.npy``): it tokenises to fixed 77-token
rows and counts the zero
padding too, which puts pad id 0 (the token "!") first with a huge count. Padding is not text, so it is not
counted here; id 0 appears only if "!" occurs in a caption. The keyword quantiser masks pad/SOT/EOT by id,
so the file order does not matter to it.

File format (shared with ``speechclip_plus.models.clip.load_vocab_usage``): one ``<token id> <count>``
line per token, in the order above.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from speechclip_plus.data.datadir import DataError
from speechclip_plus.io import atomic_write_text

CONTEXT_LENGTH = 77


def normalize_caption(text: str) -> str:
    """Strip surrounding whitespace and one trailing ``.`` (then strip again), as the reference does."""
    text = text.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def _clip_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_token_ids(texts: Iterable[str], names: Optional[Sequence[str]] = None) -> List[List[int]]:
    """[SOT, BPE ids of the normalised caption..., EOT] per text; ``DataError`` if longer than 77 tokens."""
    tok = _clip_tokenizer()
    sot, eot = int(tok.sot_token_id), int(tok.eot_token_id)
    out = []
    for k, text in enumerate(texts):
        ids = [sot] + [int(i) for i in tok.encode(normalize_caption(text))] + [eot]
        if len(ids) > CONTEXT_LENGTH:
            name = names[k] if names is not None else f"caption {k}"
            raise DataError(f"{name}: {len(ids)} CLIP tokens (with SOT/EOT) exceed the context of "
                            f"{CONTEXT_LENGTH}: {text[:60]!r}...")
        out.append(ids)
    return out


def clip_vocab_usage(texts: Iterable[str], names: Optional[Sequence[str]] = None) -> Tuple[List[int], List[int]]:
    """(token ids, counts) over ``texts``, by count descending then id ascending.

    ``names`` (e.g. ``text:utt-id`` per caption) only label errors.
    """
    counts: Counter = Counter()
    for ids in clip_token_ids(texts, names):
        counts.update(ids)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [i for i, _ in ranked], [c for _, c in ranked]


def write_vocab_usage(path: Union[str, os.PathLike], ids: Sequence[int], counts: Sequence[int]) -> None:
    """Write ``<token id> <count>`` lines atomically."""
    ids, counts = [int(i) for i in ids], [int(c) for c in counts]
    if len(ids) != len(counts):
        raise ValueError(f"write_vocab_usage({path}): {len(ids)} ids but {len(counts)} counts")
    if len(set(ids)) != len(ids):
        raise ValueError(f"write_vocab_usage({path}): token ids are not distinct")
    atomic_write_text(path, "".join(f"{i} {c}\n" for i, c in zip(ids, counts)))


def read_vocab_usage(path: Union[str, os.PathLike]) -> Tuple[List[int], List[int]]:
    """(ids, counts) of a usage file; ``DataError`` naming ``file:line`` on a malformed line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: vocabulary usage file not found")
    ids: List[int] = []
    counts: List[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            try:
                i, c = (int(x) for x in fields)
            except ValueError:
                raise DataError(f"{path}:{lineno}: expected '<token id> <count>', got {line.strip()!r}") from None
            ids.append(i)
            counts.append(c)
    return ids, counts


def train_spm(
    texts: Iterable[str],
    model_prefix: Union[str, os.PathLike],
    vocab_size: int,
    model_type: str = "bpe",
    hard_limit: bool = True,
) -> str:
    """Train sentencepiece on the normalised captions; writes ``<prefix>.model`` and ``<prefix>.vocab``.

    Training happens under a temporary prefix in the destination directory and both files are renamed
    when it succeeds. ``hard_limit``: ``vocab_size`` is exact, too large for the text is a ``DataError``;
    else it is a maximum (sentencepiece's ``hard_vocab_limit=false``: the model has as many pieces as the
    text yields, at most ``vocab_size``). Returns the ``.model`` path.
    """
    import sentencepiece as spm

    prefix = os.path.abspath(os.fspath(model_prefix))
    out_dir = os.path.dirname(prefix)
    os.makedirs(out_dir, exist_ok=True)
    lines = [normalize_caption(t) for t in texts]
    lines = [t for t in lines if t]
    if not lines:
        raise DataError("train_spm: no non-empty text")
    work = tempfile.mkdtemp(prefix=".spm-", dir=out_dir)
    try:
        corpus = os.path.join(work, "text.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.writelines(t.replace("\n", " ") + "\n" for t in lines)
        tmp_prefix = os.path.join(work, "m")
        try:
            spm.SentencePieceTrainer.train(
                input=corpus,
                model_prefix=tmp_prefix,
                vocab_size=int(vocab_size),
                model_type=model_type,
                character_coverage=1.0,
                num_threads=1,
                hard_vocab_limit=bool(hard_limit),
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise DataError(f"sentencepiece ({model_type}, vocab {vocab_size}) failed on {len(lines)} "
                            f"caption(s): {e}") from e
        for ext in (".vocab", ".model"):  # .model last: its presence means both are complete
            os.replace(tmp_prefix + ext, prefix + ext)  # the work dir is beside: an atomic rename
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return prefix + ".model"

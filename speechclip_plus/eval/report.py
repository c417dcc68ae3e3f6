"""Result files: ``results.json`` and Markdown ``RESULTS.md`` tables, written atomically.

Contract
- Every write goes through ``speechclip_plus.io`` (a temporary file in the destination's directory, renamed over
  the destination), so a reader never sees a half-written file.
- Metric values that are fractions in [0, 1] are shown in tables as percentages with 2 decimals. A key is a
  fraction if its name ends in ``_r<k>`` (recall@k), ``recall_mean_<k>``, ``_rate``, ``_rate_at<n>``,
  ``_rate_utt`` or ``coverage`` (the names used by ``retrieval.recall_at_k`` and ``keywords.keyword_metrics``),
  unless the column says otherwise. Other floats get 2 decimals, ints are printed as they are, a
  missing/None/NaN value is ``-``.
- JSON: tensors and numpy values become numbers or lists; NaN and infinities become ``null``.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from speechclip_plus.io import atomic_write_text

KINDS = ("pct", "num", "int", "text")
_FRACTION_RE = re.compile(r"(_r\d+|^recall_mean_\d+|_rate|_rate_at\d+|_rate_utt|coverage)$")

Column = Union[str, Tuple[str, str], Tuple[str, str, str]]


def is_fraction_key(key: str) -> bool:
    """True for metric names that hold a fraction in [0, 1] (see the module docstring)."""
    return bool(_FRACTION_RE.search(key))


def _jsonable(obj: Any, where: str) -> Any:
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # torch tensors, numpy arrays/scalars
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"results{where}: key {k!r} is not a string")
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"results{where}: cannot write a {type(obj).__name__} to JSON")


def write_results_json(path: str, results: Mapping[str, Any]) -> None:
    """Write ``results`` (nested dicts of numbers, strings, lists, tensors) as indented JSON, atomically."""
    if not isinstance(results, Mapping):
        raise TypeError(f"write_results_json({path}): results must be a mapping, got {type(results).__name__}")
    atomic_write_text(path, json.dumps(_jsonable(results, ""), indent=2, allow_nan=False) + "\n")


def _columns(columns: Sequence[Column]) -> List[Tuple[str, str, Optional[str]]]:
    out = []
    for c in columns:
        if isinstance(c, str):
            out.append((c, c, None))
        elif isinstance(c, tuple) and len(c) in (2, 3) and all(isinstance(x, str) for x in c):
            kind = c[2] if len(c) == 3 else None
            if kind is not None and kind not in KINDS:
                raise ValueError(f"column {c!r}: kind must be one of {KINDS}")
            out.append((c[0], c[1], kind))
        else:
            raise ValueError(f"column {c!r}: expected 'key', ('key', 'header') or ('key', 'header', kind)")
    if not out:
        raise ValueError("format_table: no columns")
    return out


def _cell(value: Any, key: str, kind: Optional[str]) -> str:
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind is None:
        if isinstance(value, bool) or isinstance(value, str):
            kind = "text"
        elif isinstance(value, int):
            kind = "int"
        elif isinstance(value, float):
            kind = "pct" if is_fraction_key(key) else "num"
        else:
            kind = "text"
    if kind == "pct":
        return f"{100.0 * float(value):.2f}"
    if kind == "num":
        return f"{float(value):.2f}"
    if kind == "int":
        return str(int(value))
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table of ``rows``: one column per entry of ``columns`` (``'key'``, ``('key', 'header')`` or
    ``('key', 'header', kind)`` with kind in pct|num|int|text; formats as in the module docstring)."""
    cols = _columns(columns)
    body = [[_cell(row.get(key), key, kind) for key, _, kind in cols] for row in rows]
    heads = [head.replace("|", "\\|") for _, head, _ in cols]
    widths = [max([len(heads[j])] + [len(r[j]) for r in body] + [3]) for j in range(len(cols))]
    numeric = [all(r[j] == "-" or _is_number(r[j]) for r in body) and bool(body) for j in range(len(cols))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w)
                                 for c, w, num in zip(cells, widths, numeric)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if num else "-" * (w + 2) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(heads), rule] + [line(r) for r in body]) + "\n"


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _read(path: str, header: str) -> str:
    if not os.path.exists(path):
        return header.rstrip("\n") + "\n"
    with open(path, encoding="utf-8") as f:
        return f.read()


def append_results_md(path: str, title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[Column],
                      header: str = "# Results", note: str = "") -> None:
    """Append ``## title``, an optional note paragraph and the table of ``rows`` to the Markdown file ``path``
    (created with ``header`` if missing). The whole new content is written atomically."""
    text = _read(path, header).rstrip("\n") + "\n\n"
    text += f"## {title}\n\n" + (note.strip() + "\n\n" if note.strip() else "") + format_table(rows, columns)
    atomic_write_text(path, text)


def _heading_lines(lines: List[str]) -> List[int]:
    """Indices of Markdown heading lines of level 1 or 2, outside fenced code blocks."""
    out, fenced = [], False
    for i, ln in enumerate(lines):
        if ln.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (ln.startswith("# ") or ln.startswith("## ")):
            out.append(i)
    return out


def write_md_section(path: str, title: str, body: str, header: str = "# Results") -> None:
    """Replace the section ``## title`` of the Markdown file ``path`` by ``body`` (up to the next level-1 or
    level-2 heading), or append it if absent; other sections are kept as they are. Atomic."""
    lines = _read(path, header).splitlines()
    heads = _heading_lines(lines)
    target = f"## {title}"
    new = [target, ""] + body.strip("\n").splitlines() + [""]
    starts = [i for i in heads if lines[i].rstrip() == target]
    if starts:
        start = starts[0]
        stop = next((i for i in heads if i > start), len(lines))
        lines = lines[:start] + new + lines[stop:]
    else:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += [""] + new
    atomic_write_text(path, "\n".join(lines).rstrip("\n") + "\n")


def read_results_json(path: str) -> Dict[str, Any]:
    """Read a file written by ``write_results_json``; a parse error names the file and line."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None

"""Evaluation: retrieval recall, keyword metrics, result files and plots.

``retrieval``, ``keywords``, ``report`` and ``plots`` work on tensors, ids and strings only and never import
``speechclip_plus.models``. Plotting lives in ``speechclip_plus.eval.plots`` (import it when needed: it pulls
in matplotlib).
"""
from __future__ import annotations

from speechclip_plus.eval.keywords import KeywordRecord, keyword_metrics, normalize_words
from speechclip_plus.eval.report import (append_results_md, format_table, is_fraction_key, read_results_json,
                                         write_md_section, write_results_json)
from speechclip_plus.eval.retrieval import recall_at_k, retrieval_ranks, top_k_images

__all__ = [
    "KeywordRecord", "keyword_metrics", "normalize_words",
    "append_results_md", "format_table", "is_fraction_key", "read_results_json", "write_md_section",
    "write_results_json",
    "recall_at_k", "retrieval_ranks", "top_k_images",
]

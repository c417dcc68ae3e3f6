"""Result files (JSON, Markdown tables and sections) and plots."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from speechclip_plus.eval.report import (append_results_md, format_table, is_fraction_key, read_results_json,
                                         write_md_section, write_results_json)
from speechclip_plus.io import atomic_path

ROWS = [
    {"model": "c+", "speech_to_image_r1": 0.12345, "recall_mean_10": 0.5, "mean_keywords": 7.126,
     "n_keywords": 40},
    {"model": "a|b", "speech_to_image_r1": float("nan"), "recall_mean_10": torch.tensor(1.0), "n_keywords": 3},
]
COLS = ["model", ("speech_to_image_r1", "S>I R@1"), "recall_mean_10", "mean_keywords", "n_keywords"]


def leftovers(directory):
    return [f for f in os.listdir(directory) if ".tmp" in f]


def test_format_table_formats_by_kind():
    lines = format_table(ROWS, COLS).splitlines()
    assert len(lines) == 4
    cells = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in (lines[0], lines[2], lines[3])]
    assert cells[0] == ["model", "S>I R@1", "recall_mean_10", "mean_keywords", "n_keywords"]
    assert cells[1] == ["c+", "12.35", "50.00", "7.13", "40"]  # fractions as percentages, others 2 decimals
    assert cells[2] == ["a\\|b", "-", "100.00", "-", "3"]  # NaN and missing are "-", pipes escaped
    assert lines[1].endswith("-:|")  # numeric columns right-aligned
    pct_forced = format_table([{"x": 0.5}], [("x", "x", "pct")]).splitlines()[2]
    assert "50.00" in pct_forced


def test_keyword_metric_names_are_fractions_or_not():
    for key in ("coverage", "word_coverage", "excess_duplicate_rate", "adjacent_repeat_rate", "subword_hit_rate_utt",
                "word_hit_rate_utt", "subword_hit_rate_at5", "speech_to_image_r10"):
        assert is_fraction_key(key), key
    for key in ("mean_keywords", "count_error", "n_utterances", "coverage_count", "mean_target"):
        assert not is_fraction_key(key), key
    cells = format_table([{"coverage": 0.5, "word_hit_rate_utt": 0.25, "mean_keywords": 0.5}],
                         ["coverage", "word_hit_rate_utt", "mean_keywords"]).splitlines()[2]
    assert [c.strip() for c in cells.strip("|").split("|")] == ["50.00", "25.00", "0.50"]


def test_append_twice_gives_two_tables(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    append_results_md(path, "first", ROWS[:1], COLS, header="# My results")
    append_results_md(path, "second", ROWS, COLS, header="# ignored once the file exists")
    text = open(path).read()
    assert text.startswith("# My results\n") and "ignored" not in text
    assert text.count("## first") == 1 and text.count("## second") == 1
    assert text.count("| model") == 2  # two header rows
    assert text.index("## first") < text.index("## second")
    assert text.count("| c+ ") == 2
    assert not leftovers(tmp_path)


def test_md_section_replaced_in_place_and_others_kept(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    write_md_section(path, "CIF", "cif v1")
    write_md_section(path, "Retrieval", "ret v1\n```\n## not a heading\n```")
    write_md_section(path, "CIF", "cif v2")
    text = open(path).read()
    assert "cif v1" not in text and "cif v2" in text and "## not a heading" in text
    assert text.index("## CIF") < text.index("## Retrieval")  # replaced where it was
    write_md_section(path, "Retrieval", "ret v2")
    text = open(path).read()
    assert "ret v1" not in text and "not a heading" not in text and text.count("## Retrieval") == 1


def test_json_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "results.json")
    results = {"retrieval": {"speech_to_image_r1": 0.25, "ranks": torch.tensor([1, 2])},
               "keywords": {"word_hit_rate": float("nan"), "n": np.int64(3), "mean": np.float32(0.5)},
               "name": "tiny", "ok": True}
    write_results_json(path, results)
    back = read_results_json(path)
    assert back == {"retrieval": {"speech_to_image_r1": 0.25, "ranks": [1, 2]},
                    "keywords": {"word_hit_rate": None, "n": 3, "mean": 0.5}, "name": "tiny", "ok": True}
    json.loads(open(path).read())  # strict JSON (no NaN)
    with pytest.raises(TypeError, match=r"\['keywords'\]\['bad'\]"):
        write_results_json(path, {"keywords": {"bad": object()}})
    assert read_results_json(path) == back  # failed write left the old file
    assert not leftovers(tmp_path / "sub")


def test_failed_writer_keeps_old_file_and_no_temp(tmp_path):
    path = str(tmp_path / "x.txt")
    open(path, "w").write("old")

    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("disk full")
    assert open(path).read() == "old" and not leftovers(tmp_path)


def png_size(path):
    assert os.path.getsize(path) > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size, np.asarray(im.convert("RGB"))


def test_cif_plot_size(tmp_path):
    from speechclip_plus.eval.plots import plot_cif_segmentation

    rng = np.random.default_rng(0)
    wav = rng.standard_normal(24000).astype(np.float32) * 0.1  # 1.5 s
    alpha = rng.uniform(0, 0.5, 75)  # 50 Hz frames
    path = str(tmp_path / "cif.png")
    plot_cif_segmentation(path, wav, alpha, [10, 30, 30, 60], ["a</w>", "dog</w>", "run", "ning</w>", "tail"],
                          frame_rate_hz=50.0, title="utt1", figsize=(6.0, 2.0), dpi=50)
    size, _ = png_size(path)
    assert size == (300, 100)
    assert not leftovers(tmp_path)
    with pytest.raises(ValueError, match="keywords"):
        plot_cif_segmentation(path, wav, alpha, [10], ["a", "b", "c"], frame_rate_hz=50.0)
    with pytest.raises(ValueError, match="fire frames"):
        plot_cif_segmentation(path, wav, alpha, [75], ["a"], frame_rate_hz=50.0)


def test_retrieval_plot_size_and_green_frame(tmp_path):
    from speechclip_plus.eval.plots import plot_retrieval_examples

    rng = np.random.default_rng(0)
    img_path = str(tmp_path / "img.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(img_path)
    gray = [np.full((32, 32, 3), 0.5) for _ in range(4)]
    queries = [("a dog runs on the grass", [img_path] + gray, 2), ("a cat", gray[:3], None)]
    path = str(tmp_path / "top5.png")
    plot_retrieval_examples(path, queries, cell_inches=(2.0, 2.5), dpi=40)
    size, pixels = png_size(path)
    assert size == (2 * 5 * 40, int(2.5 * 2 * 40))
    lime = np.all(pixels == [0, 255, 0], axis=-1)
    assert lime.any()
    assert not lime[pixels.shape[0] // 2 + 5:].any()  # second row has no correct image
    with pytest.raises(ValueError, match="correct index 3"):
        plot_retrieval_examples(path, [("x", gray[:3], 3)])


def test_keyword_by_k_plot_size_series_and_errors(tmp_path):
    from speechclip_plus.eval.plots import plot_keyword_metrics_by_k

    c = {"5-8": {"n_utterances": 10, "subword_hit_rate": 0.7, "coverage": 0.4, "word_coverage": 0.4,
                 "excess_duplicate_rate": -0.1, "adjacent_repeat_rate": 0.2}}
    cplus = {"0": {"n_utterances": 1, "subword_hit_rate": float("nan"), "coverage": 0.0},  # NaN and missing: gaps
             "9-12": {"n_utterances": 6, "subword_hit_rate": 0.8, "coverage": 0.5, "adjacent_repeat_rate": None},
             "17+": {"n_utterances": 3, "subword_hit_rate": 0.6, "coverage": 0.7}}
    path = str(tmp_path / "by_k.png")
    plot_keyword_metrics_by_k(path, {"c": c}, panel_inches=(2.0, 1.5), dpi=50)
    size, one = png_size(path)
    assert size == (3 * 2 * 50, 2 * 1.5 * 50)  # 5 metrics + counts = 6 panels in 3 columns
    plot_keyword_metrics_by_k(path, {"c": c, "c+": cplus}, panel_inches=(2.0, 1.5), dpi=50)
    _, two = png_size(path)
    orange = np.all(np.abs(two.astype(int) - [255, 127, 14]) < 30, axis=-1)  # matplotlib's second colour
    assert orange.sum() > np.all(np.abs(one.astype(int) - [255, 127, 14]) < 30, axis=-1).sum() + 50
    assert not leftovers(tmp_path)
    with pytest.raises(ValueError, match="unknown K bin"):
        plot_keyword_metrics_by_k(path, {"c": {"8": c["5-8"]}})
    with pytest.raises(ValueError, match="no series"):
        plot_keyword_metrics_by_k(path, {})
    with pytest.raises(ValueError, match="empty"):
        plot_keyword_metrics_by_k(path, {"c": {}})

"""Scoring (stage 5), export (stage 6) and extraction on a generated corpus and a briefly trained tiny model
(``make_data_dir`` / ``train_exp`` from conftest.py).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "speechclip_plus" / "conf"


@pytest.fixture(scope="module")
def scored(tmp_path_factory, make_data_dir, train_exp):
    """A trained tiny hplus exp dir scored on a test set of 3 images x 2 captions."""
    from speechclip_plus.bin.score import main

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("score")
    exp, _ = train_exp(root, "hplus")
    data, emb = make_data_dir(root, "test")
    out = exp / "test"
    args = ["--exp_dir", str(exp), "--data_dir", str(data), "--image_embeds", str(emb), "--out_dir", str(out),
            "--batch_size", "1", "--num_plots", "2", "--no_progress", "--device", "cpu"]
    assert main(args) == 0
    return {"root": root, "exp": exp, "data": data, "emb": emb, "out": out, "args": args}


def _utts(data: Path):
    return [line.split()[0] for line in (data / "wav.scp").read_text().splitlines()]


def _wav_paths(data: Path):
    return [line.split(maxsplit=1)[1] for line in (data / "wav.scp").read_text().splitlines()]


def test_results_json_matches_direct_recall_on_model_embeddings(scored):
    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.data import load_image_embeddings
    from speechclip_plus.eval.retrieval import recall_at_k

    res = json.loads((scored["out"] / "results.json").read_text())
    assert res["variant"] == "hplus" and res["retrieval_branch"] == "parallel"
    assert res["n_utterances"] == 6 and res["n_images"] == 3
    assert res["model"]["checkpoint"] == "best.pt" and res["model"]["step"] == 2
    assert set(res["retrieval"]) == {"parallel", "cascaded", "combined"}

    api = SpeechCLIPPlus.from_pretrained(scored["exp"])
    data = scored["data"]
    utt2img = dict(line.split() for line in (data / "utt2img").read_text().splitlines())
    images = sorted(set(utt2img.values()))
    table = load_image_embeddings(scored["emb"])
    img = torch.nn.functional.normalize(torch.stack([torch.from_numpy(table[i]) for i in images]), dim=-1)
    s2i = torch.tensor([images.index(utt2img[u]) for u in _utts(data)])
    for branch in ("parallel", "cascaded", "combined"):
        speech = api.embed_speech(_wav_paths(data), branch=branch, batch_size=1)
        expected = recall_at_k(speech, img, s2i, ks=(1, 5, 10))
        assert res["retrieval"][branch] == expected, branch

    kw = res["keywords"]
    for key in ("subword_hit_rate", "subword_hit_rate_at5", "word_hit_rate", "duplicate_rate", "mean_keywords",
                "mean_target", "count_error", "n_keywords", "text_duplicate_rate", "excess_duplicate_rate",
                "coverage", "word_coverage", "adjacent_repeat_rate", "subword_hit_rate_utt", "word_hit_rate_utt"):
        assert key in kw, key
    # the keyword file holds exactly what the API reads for each utterance
    lines = (scored["out"] / "keywords.txt").read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == _utts(data)
    for line, path in zip(lines, _wav_paths(data)):
        assert line.split()[1:] == [k["token"] for k in api.keywords(path)]
    assert kw["n_keywords"] == sum(len(ln.split()) - 1 for ln in lines)
    detail = [json.loads(x) for x in (scored["out"] / "keywords.jsonl").read_text().splitlines()]
    assert detail[0]["text_tokens"][:2] == ["a</w>", "dog</w>"]  # CLIP BPE of "A dog and the cat." (conftest.py)
    assert "." not in "".join(detail[0]["text_tokens"])  # trailing period removed before tokenising
    assert all(k["start"] <= k["end"] for d in detail for k in d["keywords"])


def test_keyword_comparison_metrics_follow_the_keyword_file(scored):
    """coverage, duplicates, adjacent repeats and the K bins of results.json, recomputed from keywords.jsonl."""
    from open_clip.tokenizer import SimpleTokenizer

    from speechclip_plus.eval.keywords import k_bin, normalize_words

    kw = json.loads((scored["out"] / "results.json").read_text())["keywords"]
    detail = [json.loads(x) for x in (scored["out"] / "keywords.jsonl").read_text().splitlines()]
    keys = [[k["token_id"] for k in d["keywords"]] for d in detail]
    vocab = SimpleTokenizer().encoder  # the captions are ASCII words, whose vocabulary entry is the token string
    text = [[vocab[t] for t in d["text_tokens"]] for d in detail]
    assert kw["coverage"] == pytest.approx(np.mean([len(set(k) & set(t)) / len(set(t)) for k, t in zip(keys, text)]))
    words = [set(normalize_words(d["text"])) for d in detail]
    kw_words = [{k["token"][:-4] for k in d["keywords"] if k["token"].endswith("</w>")} for d in detail]
    assert kw["word_coverage"] == pytest.approx(np.mean([len(w & v) / len(w) for w, v in zip(words, kw_words)]))
    assert kw["adjacent_repeat_rate"] == pytest.approx(
        sum(a == b for k in keys for a, b in zip(k, k[1:])) / sum(len(k) for k in keys))
    spoken = [(k, t) for k, t in zip(keys, text) if k]
    dup = [(1 - len(set(k)) / len(k)) - (1 - len(set(t)) / len(t)) for k, t in spoken]
    assert kw["excess_duplicate_rate"] == pytest.approx(np.mean(dup))
    assert kw["excess_duplicate_rate"] == pytest.approx(kw["duplicate_rate"] - kw["text_duplicate_rate"])
    bins = {}
    for k in keys:
        bins[k_bin(len(k))] = bins.get(k_bin(len(k)), 0) + 1
    assert {b: m["n_utterances"] for b, m in kw["by_k"].items()} == bins
    assert sum(m["n_keywords"] for m in kw["by_k"].values()) == kw["n_keywords"]


def _md_rows(table: str):
    """Cells of each row of a Markdown table (header, rule, body), split at unescaped pipes."""
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln.strip()[1:-1])] for ln in table.splitlines()]


def test_results_table_columns_and_by_k_table():
    from speechclip_plus.eval.scoring import keyword_by_k_table, results_table

    kw = {"subword_hit_rate": 0.5, "subword_hit_rate_at5": 0.75, "word_hit_rate": 0.25, "coverage": 0.4,
          "word_coverage": 0.3, "duplicate_rate": 0.2, "excess_duplicate_rate": -0.05, "adjacent_repeat_rate": 0.125,
          "mean_keywords": 8.0, "count_error": None,
          "by_k": {"5-8": {"n_utterances": 3, "mean_keywords": 6.5, "subword_hit_rate": 0.5, "word_hit_rate": 0.25,
                           "coverage": 0.4, "word_coverage": 0.3, "excess_duplicate_rate": float("nan"),
                           "adjacent_repeat_rate": 0.125},
                   "17+": {"n_utterances": 1, "mean_keywords": 20.0, "coverage": 1.0}}}
    results = {"retrieval": {"parallel": {}, "cascaded": {}}, "retrieval_branch": "parallel", "keywords": kw}
    cells = _md_rows(results_table(results))
    head, cascaded = cells[0], next(c for c in cells if c[0] == "cascaded")
    row = dict(zip(head, cascaded))
    assert head[7:10] == ["kw subword hit", "kw hit@5", "kw word hit"]  # the recipes test reads these by place
    assert (row["kw cover"], row["word cover"], row["kw dup"], row["excess dup"], row["adj repeat"]) == \
        ("40.00", "30.00", "20.00", "-5.00", "12.50")
    assert (row["mean K"], row["\\|K-target\\|"]) == ("8.00", "-")
    by_k = _md_rows(keyword_by_k_table(kw))
    assert by_k[0] == ["K", "utterances", "mean K", "subword hit", "word hit", "cover", "word cover", "excess dup",
                       "adj repeat"]
    assert by_k[2] == ["5-8", "3", "6.50", "50.00", "25.00", "40.00", "30.00", "-", "12.50"]
    assert by_k[3][:3] == ["17+", "1", "20.00"] and by_k[3][5] == "100.00" and by_k[3][3] == "-"


def _md_tables(md: str):
    """The Markdown tables of a RESULTS.md, each as {first cell: row line}, in order."""
    tables, current = [], None
    for line in md.splitlines():
        if line.startswith("|-"):
            continue
        if line.startswith("| "):
            if current is None:
                current = {"header": line}
                tables.append(current)
            else:
                current[line.split("|")[1].strip()] = line
        else:
            current = None
    return tables


def test_results_md_table_and_plots(scored):
    from speechclip_plus.eval.retrieval import chance_recall

    md = (scored["exp"] / "RESULTS.md").read_text()
    assert md.count("## test: best.pt (step 2)") == 1
    images, k_table, texts = _md_tables(md)  # per branch; keywords per K bin; speech <-> text
    assert images["header"].startswith("| branch") and "S→I R@1" in images["header"]
    assert "kw subword hit" in images["header"]
    assert set(images) - {"header"} == {"parallel *", "cascaded", "combined", "chance"}
    res = json.loads((scored["out"] / "results.json").read_text())
    r1 = f"{100 * res['retrieval']['cascaded']['speech_to_image_r1']:.2f}"
    assert images["cascaded"].split("|")[2].strip() == r1
    dup = f"{100 * res['keywords']['duplicate_rate']:.2f}"
    assert dup in images["cascaded"] and images["parallel *"].rstrip(" |").endswith("-")
    cover = f"{100 * res['keywords']['coverage']:.2f}"
    assert cover in images["cascaded"]
    assert k_table["header"].startswith("| K ") and "adj repeat" in k_table["header"]
    by_k = {k: v for k, v in k_table.items() if k != "header"}
    assert list(by_k) == list(res["keywords"]["by_k"])  # one row per bin, in order
    for label, line in by_k.items():
        assert line.split("|")[2].strip() == str(res["keywords"]["by_k"][label]["n_utterances"])
    # the chance row: 3 images with 2 utterances each (S->I R@1 = 1/3; I->S R@1 = 2/6; R@5 is 1 for any model)
    assert res["chance"]["retrieval"] == chance_recall([0, 0, 1, 1, 2, 2])
    assert [c.strip() for c in images["chance"].split("|")[2:8]] == ["33.33", "100.00", "100.00"] * 2
    # zero-shot speech <-> text: its own table with the branches in CLIP's space and a chance row
    assert "S→T R@1" in texts["header"] and "T→S R@10" in texts["header"]
    assert set(texts) - {"header"} == {"parallel", "cascaded", "chance"}
    s2t = f"{100 * res['text_retrieval']['cascaded']['speech_to_text_r5']:.2f}"
    assert texts["cascaded"].split("|")[3].strip() == s2t
    assert "SpeechCLIP's zero-shot number" in md

    plots = sorted(os.listdir(scored["out"] / "plots"))
    utts = _utts(scored["data"])
    assert plots == sorted([f"cif_{utts[0]}.png", f"cif_{utts[1]}.png", "retrieval_parallel.png",
                            "keywords_by_k.png", "text_retrieval_parallel.png"])
    for p in plots:
        assert (scored["out"] / "plots" / p).read_bytes()[:4] == b"\x89PNG"
    assert sorted(res["plots"]) == [f"plots/{p}" for p in plots]


def test_text_retrieval_equals_api_embeddings_against_clip_text(scored):
    """results.json's speech <-> text recall = recall_at_k of the API's speech embeddings against the API's
    CLIP text embeddings of the distinct transcriptions; repeated captions are one candidate."""
    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.eval.retrieval import recall_at_k
    from speechclip_plus.eval.scoring import text_matrix

    res = json.loads((scored["out"] / "results.json").read_text())
    assert set(res["text_retrieval"]) == {"parallel", "cascaded"}  # combined is not in CLIP's text space
    api = SpeechCLIPPlus.from_pretrained(scored["exp"])
    data = scored["data"]
    text = dict(line.split(" ", 1) for line in (data / "text").read_text().splitlines())
    captions = [text[u].rstrip(".") for u in _utts(data)]
    distinct = sorted(set(captions))
    assert res["n_texts"] == len(distinct) == 6
    txt = api.embed_text(distinct)
    s2t = torch.tensor([distinct.index(c) for c in captions])
    for branch in ("parallel", "cascaded"):
        speech = api.embed_speech(_wav_paths(data), branch=branch, batch_size=1)
        expected = recall_at_k(speech, txt, s2t, ks=(1, 5, 10), names=("speech_to_text", "text_to_speech"))
        assert res["text_retrieval"][branch] == pytest.approx(expected, abs=1e-9), branch
    # duplicates: the same CLIP tokens (case, spacing, a final period) make one candidate
    unique, emb, rows = text_matrix(api.model, ["A dog runs.", "a  dog RUNS", "A cat", "A dog runs"])
    assert unique == ["A dog runs", "A cat"] and rows.tolist() == [0, 0, 1, 0]
    assert emb.shape == (2, api.embed_dim)
    assert torch.allclose(emb[0], api.embed_text("a dog runs")[0], atol=1e-6)


def test_rescoring_replaces_its_section_and_untrained_adds_one(scored):
    from speechclip_plus.bin.score import main

    assert main(scored["args"]) == 0
    out2 = scored["root"] / "untrained"
    args = scored["args"][:7] + [str(out2), "--untrained", "--num_plots", "0", "--no_progress"]
    assert main(args) == 0
    md = (scored["exp"] / "RESULTS.md").read_text()
    assert md.count("## test: best.pt (step 2)") == 1
    assert md.count("## test: untrained (seed 7122)") == 1
    trained = json.loads((scored["out"] / "results.json").read_text())
    untrained = json.loads((out2 / "results.json").read_text())
    assert untrained["model"]["untrained"] is True and trained["model"]["checkpoint"] == "best.pt"
    assert not (out2 / "plots").exists()


def test_score_cli_errors_name_the_problem(scored, capsys):
    from speechclip_plus.bin.score import main

    assert main(scored["args"] + ["--checkpoint", "last.pt"]) == 1
    assert "checkpoint not found: last.pt" in capsys.readouterr().err
    bad = list(scored["args"])
    bad[bad.index("--image_embeds") + 1] = str(scored["root"] / "missing.scp")
    assert main(bad) == 1
    assert "missing.scp" in capsys.readouterr().err


def test_export_and_extract_cli(scored, tmp_path, monkeypatch):
    import kaldiio

    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.bin.export import main as export_main
    from speechclip_plus.bin.extract import main as extract_main

    monkeypatch.setenv("SPEECHCLIP_PLUS_CACHE", str(tmp_path / "cache"))
    model_file = tmp_path / "model.pt"
    assert export_main(["--exp_dir", str(scored["exp"]), "--out", str(model_file)]) == 0
    payload = torch.load(model_file, weights_only=True)
    assert payload["meta"] == {"checkpoint": "best.pt", "step": 2, "exp": "tiny_hplus"}
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temporary file left
    api = SpeechCLIPPlus.from_pretrained(model_file)
    paths = _wav_paths(scored["data"])

    out = tmp_path / "emb"
    assert extract_main(["--model", str(model_file), "--data_dir", str(scored["data"]), "--out_dir", str(out),
                         "--branch", "cascaded", "--batch_size", "4", "--no_progress"]) == 0
    got = dict(kaldiio.load_scp(str(out / "embed.scp")))
    assert list(got) == _utts(scored["data"])
    ref = api.embed_speech(paths, branch="cascaded")
    torch.testing.assert_close(torch.stack([torch.from_numpy(got[u]) for u in got]), ref, atol=1e-5, rtol=0)

    assert extract_main(["--exp_dir", str(scored["exp"]), "--data_dir", str(scored["data"]), "--out_dir",
                         str(out), "--branch", "hidden", "--layer", "0", "--no_progress"]) == 0
    got = dict(kaldiio.load_scp(str(out / "embed.scp")))
    for u, p in zip(_utts(scored["data"]), paths):
        torch.testing.assert_close(torch.from_numpy(got[u]), api.hidden_states(p)[0], atol=1e-5, rtol=0)
    assert sorted(os.listdir(out)) == ["embed.ark", "embed.scp"]
    first = (out / "embed.scp").read_text().splitlines()[0]
    assert re.match(rf"^\S+ {re.escape(str(out))}/embed\.ark:\d+$", first)

    assert extract_main(["--model", str(model_file), "--data_dir", str(scored["data"]), "--out_dir", str(out),
                         "--branch", "hidden", "--layer", "9", "--no_progress"]) == 1
    assert export_main(["--exp_dir", str(tmp_path), "--out", str(tmp_path / "x.pt")]) == 1

"""Keyword metrics on small cases worked out by hand from the definitions in keywords.py."""
import math

import pytest

from speechclip_plus.eval.keywords import K_BINS, KeywordRecord, k_bin, keyword_metrics, normalize_words

VOCAB = {1: "a</w>", 2: "dog</w>", 3: "run", 4: "ning</w>", 5: "s</w>", 6: "cat</w>", 7: "grass</w>",
         8: "the</w>", 9: "'s</w>", 10: "on</w>", 11: "and</w>", 12: "...</w>"}


def records(with_neighbors=True, with_target=True):
    recs = [
        # "A dog's running." -> a</w> dog</w> 's</w> run ning</w>
        dict(utt="u1", keywords=[2, 2, 3, 6], text_tokens=[1, 2, 9, 3, 4], words=["A", "dog's", "running."],
             neighbors=[[2, 9, 1, 3, 4], [6, 7, 8, 5, 1], [3, 5, 5, 5, 5], [6, 7, 8, 5, 7, 4]], target=3),
        # "the grass": keyword s</w> is a whole word, but "s" is a word of u1 only
        dict(utt="u2", keywords=[5], text_tokens=[8, 7], words=["the", "grass"], neighbors=[[5, 8, 1, 2, 3]],
             target=2),
        # "the cat": CIF fired nothing
        dict(utt="u3", keywords=[], text_tokens=[8, 6], words=["the", "cat"], neighbors=[], target=1),
    ]
    for r in recs:
        if not with_neighbors:
            del r["neighbors"]
        if not with_target:
            del r["target"]
    return recs


def test_hand_computed_metrics():
    got = keyword_metrics(records(), VOCAB)
    # 5 keywords: 2, 2, 3, 6 | 5 | -
    assert got["n_utterances"] == 3 and got["n_keywords"] == 5
    assert got["subword_hit_rate"] == pytest.approx(3 / 5)  # 2, 2, 3 occur in u1's tokens
    # top-5 neighbours: u1 kw0 (2), kw1 (1 at 5th place), kw2 (3) hit; kw3's only hit (4) is 6th; u2 hits 8
    assert got["subword_hit_rate_at5"] == pytest.approx(4 / 5)
    assert got["word_hit_rate"] == pytest.approx(2 / 5)  # dog</w> twice; cat</w> not in u1; s</w> not in u2
    assert got["word_token_rate"] == pytest.approx(4 / 5)  # all but "run"
    assert got["duplicate_rate"] == pytest.approx((1 - 3 / 4 + 0) / 2)  # u3 (K=0) left out
    assert got["mean_keywords"] == pytest.approx(5 / 3)
    assert got["mean_text_tokens"] == pytest.approx(3.0)
    assert got["mean_target"] == pytest.approx(2.0)
    assert got["count_error"] == pytest.approx((1 + 1 + 1) / 3)


def test_fewer_neighbours_counted_and_optional_fields():
    got = keyword_metrics(records(), VOCAB, n_neighbors=1)
    assert got["subword_hit_rate_at1"] == pytest.approx(2 / 5)  # only 2 and 3 are their own nearest hit
    plain = keyword_metrics(records(with_neighbors=False, with_target=False), VOCAB.__getitem__)
    assert not any(k.startswith("subword_hit_rate_at") for k in plain)
    assert "count_error" not in plain and "mean_target" not in plain
    assert plain["word_hit_rate"] == pytest.approx(2 / 5)  # callable lookup gives the same


def test_records_as_dataclasses():
    recs = [KeywordRecord(**r) for r in records()]
    assert keyword_metrics(recs, VOCAB) == keyword_metrics(records(), VOCAB)


def test_no_keywords_at_all_gives_nan_rates():
    got = keyword_metrics([dict(keywords=[], text_tokens=[8], words=["the"], target=2)], VOCAB)
    assert math.isnan(got["subword_hit_rate"]) and math.isnan(got["duplicate_rate"])
    assert got["count_error"] == 2.0


def test_normalize_words_splits_like_clip():
    assert normalize_words("The dog's T-shirt, 12!") == ["the", "dog", "s", "t", "shirt", "1", "2"]
    assert normalize_words("  Café  ") == ["café"]


def test_bad_records_raise_clear_errors():
    recs = records()
    del recs[1]["neighbors"]
    with pytest.raises(ValueError, match=r"record 1 \(u2\).*neighbors"):
        keyword_metrics(recs, VOCAB)
    recs = records()
    recs[0]["neighbors"] = recs[0]["neighbors"][:3]
    with pytest.raises(ValueError, match=r"u1.*3 neighbour lists for 4 keywords"):
        keyword_metrics(recs, VOCAB)
    recs = records()
    recs[2]["keywords"] = [99]
    recs[2]["neighbors"] = [[1, 2, 3, 4, 5]]
    with pytest.raises(KeyError, match="u3.*99"):
        keyword_metrics(recs, VOCAB)
    with pytest.raises(ValueError, match="unknown key"):
        keyword_metrics([dict(keywords=[1], text_tokens=[1], words=["a"], tokens=[1])], VOCAB)
    with pytest.raises(ValueError, match="need 6"):
        keyword_metrics(records(), VOCAB, n_neighbors=6)


def comparison_records():
    """Five utterances for the metrics that compare c with c+; every count is worked out in the comments."""
    return [
        # A, K = 8: "a dog and a cat on the grass" = a dog and a cat on the grass (T = 8, 7 distinct: "a" twice)
        # keywords dog dog cat on on on run grass: 5 distinct; repeats at j = 2, 5, 6; "run" misses;
        # covered tokens {dog, cat, on, grass} = 4 of 7; covered words the same 4 of 7
        dict(utt="A", keywords=[2, 2, 6, 10, 10, 10, 3, 7], text_tokens=[1, 2, 11, 1, 6, 10, 8, 7],
             words="a dog and a cat on the grass".split()),
        # B, K = 1: "the running" = the run ning; keyword "run" (a subword): a hit that covers 1 of 3 tokens and
        # no word (not a whole-word token)
        dict(utt="B", keywords=[3], text_tokens=[8, 3, 4], words=["the", "running"]),
        # C, K = 0: "the cat"; covers nothing; no duplicate, repeat or per-utterance hit rate
        dict(utt="C", keywords=[], text_tokens=[8, 6], words=["the", "cat"]),
        # D, K = 2, empty transcription: the the; 1 repeat, 2 misses; no coverage and no text duplicate rate
        dict(utt="D", keywords=[8, 8], text_tokens=[], words=[]),
        # E, K = 13: "a cat"; keywords a cat a cat ... a: all hit, 2 distinct, no adjacent repeat, full coverage
        dict(utt="E", keywords=[1, 6] * 6 + [1], text_tokens=[1, 6], words=["a", "cat"]),
    ]


def test_comparison_metrics_hand_computed():
    got = keyword_metrics(comparison_records(), VOCAB)
    assert got["n_utterances"] == 5 and got["n_keywords"] == 8 + 1 + 0 + 2 + 13 == 24
    # pooled over the 24 keywords
    assert got["subword_hit_rate"] == pytest.approx((7 + 1 + 0 + 0 + 13) / 24)
    assert got["word_token_rate"] == pytest.approx((7 + 0 + 0 + 2 + 13) / 24)
    assert got["word_hit_rate"] == pytest.approx((7 + 0 + 0 + 0 + 13) / 24)
    assert got["adjacent_repeat_rate"] == pytest.approx((3 + 0 + 0 + 1 + 0) / 24)
    # per utterance, over A, B, D, E (K >= 1)
    assert got["subword_hit_rate_utt"] == pytest.approx((7 / 8 + 1 + 0 + 1) / 4)
    assert got["word_hit_rate_utt"] == pytest.approx((7 / 8 + 0 + 0 + 1) / 4)
    assert got["duplicate_rate"] == pytest.approx((3 / 8 + 0 + 1 / 2 + 11 / 13) / 4)
    # over A, B, E (K >= 1 and T >= 1): D's empty transcription has no duplicate rate
    assert got["text_duplicate_rate"] == pytest.approx((1 / 8 + 0 + 0) / 3)
    assert got["excess_duplicate_rate"] == pytest.approx(((3 / 8 - 1 / 8) + 0 + 11 / 13) / 3)
    # over A, B, C, E (a transcription); C (K = 0) covers nothing
    assert got["coverage"] == pytest.approx((4 / 7 + 1 / 3 + 0 + 1) / 4)
    assert got["word_coverage"] == pytest.approx((4 / 7 + 0 + 0 + 1) / 4)
    assert got["mean_keywords"] == pytest.approx(24 / 5)
    assert got["mean_text_tokens"] == pytest.approx((8 + 3 + 2 + 0 + 2) / 5)


def test_comparison_metrics_by_k_hand_computed():
    by_k = keyword_metrics(comparison_records(), VOCAB)["by_k"]
    assert list(by_k) == ["0", "1-4", "5-8", "13-16"]  # empty bins left out, in K order
    zero, small, eight, big = (by_k[b] for b in ("0", "1-4", "5-8", "13-16"))
    assert (zero["n_utterances"], small["n_utterances"], eight["n_utterances"], big["n_utterances"]) == (1, 2, 1, 1)
    assert (zero["n_keywords"], small["n_keywords"], eight["n_keywords"], big["n_keywords"]) == (0, 3, 8, 13)
    # "0" = C: rates over keywords are undefined, coverage is 0
    for key in ("subword_hit_rate", "adjacent_repeat_rate", "duplicate_rate", "text_duplicate_rate",
                "excess_duplicate_rate", "subword_hit_rate_utt"):
        assert math.isnan(zero[key]), key
    assert zero["coverage"] == 0 and zero["word_coverage"] == 0 and zero["mean_keywords"] == 0
    # "1-4" = B, D
    assert small["subword_hit_rate"] == pytest.approx(1 / 3)
    assert small["adjacent_repeat_rate"] == pytest.approx(1 / 3)
    assert small["duplicate_rate"] == pytest.approx((0 + 1 / 2) / 2)
    assert small["text_duplicate_rate"] == 0 and small["excess_duplicate_rate"] == 0  # B only
    assert small["coverage"] == pytest.approx(1 / 3) and small["word_coverage"] == 0  # B only
    assert small["subword_hit_rate_utt"] == pytest.approx((1 + 0) / 2)
    # "5-8" = A, "13-16" = E
    assert eight["adjacent_repeat_rate"] == pytest.approx(3 / 8)
    assert eight["excess_duplicate_rate"] == pytest.approx(3 / 8 - 1 / 8)
    assert eight["coverage"] == pytest.approx(4 / 7) and eight["word_coverage"] == pytest.approx(4 / 7)
    assert big["adjacent_repeat_rate"] == 0 and big["duplicate_rate"] == pytest.approx(11 / 13)
    assert big["coverage"] == 1 and big["word_coverage"] == 1


def test_by_k_is_the_metrics_of_each_bin_alone():
    recs = comparison_records() + records(with_neighbors=False, with_target=False)
    got = keyword_metrics(recs, VOCAB)
    assert sum(b["n_utterances"] for b in got["by_k"].values()) == len(recs)
    for label, metrics in got["by_k"].items():
        alone = keyword_metrics([r for r in recs if k_bin(len(r["keywords"])) == label], VOCAB)
        alone.pop("by_k")
        assert metrics.keys() == alone.keys()
        for key, value in metrics.items():
            assert value == alone[key] or (math.isnan(value) and math.isnan(alone[key])), (label, key)


def test_keywords_equal_to_the_transcription():
    # "a dog and a cat": the transcription's own tokens as keywords repeat "a" (1 - 4/5) but add no excess
    text = [1, 2, 11, 1, 6]
    got = keyword_metrics([dict(keywords=text, text_tokens=text, words="a dog and a cat".split())], VOCAB)
    assert got["duplicate_rate"] == pytest.approx(1 / 5) and got["text_duplicate_rate"] == pytest.approx(1 / 5)
    assert got["excess_duplicate_rate"] == 0
    assert got["coverage"] == 1 and got["word_coverage"] == 1 and got["adjacent_repeat_rate"] == 0
    # 4 distinct keywords out of the same caption: no duplicate, so fewer than the caption's own (-1/5)
    got = keyword_metrics([dict(keywords=[1, 2, 11, 6], text_tokens=text, words="a dog and a cat".split())], VOCAB)
    assert got["excess_duplicate_rate"] == pytest.approx(0 - 1 / 5) and got["coverage"] == 1


def test_edge_cases_one_keyword_no_keyword_empty_transcription():
    one = keyword_metrics([dict(keywords=[6], text_tokens=[8, 6], words=["the", "cat"])], VOCAB)
    assert one["duplicate_rate"] == 0 and one["adjacent_repeat_rate"] == 0  # one keyword repeats nothing
    assert one["coverage"] == pytest.approx(1 / 2) and one["word_coverage"] == pytest.approx(1 / 2)
    assert one["subword_hit_rate_utt"] == 1 and one["by_k"]["1-4"]["n_keywords"] == 1
    none = keyword_metrics([dict(keywords=[], text_tokens=[8, 6], words=["the", "cat"])], VOCAB)
    for key in ("adjacent_repeat_rate", "subword_hit_rate_utt", "word_hit_rate_utt", "text_duplicate_rate",
                "excess_duplicate_rate"):
        assert math.isnan(none[key]), key
    assert none["coverage"] == 0 and none["word_coverage"] == 0 and list(none["by_k"]) == ["0"]
    empty = keyword_metrics([dict(keywords=[8, 8], text_tokens=[], words=[])], VOCAB)
    for key in ("coverage", "word_coverage", "text_duplicate_rate", "excess_duplicate_rate"):
        assert math.isnan(empty[key]), key
    assert empty["duplicate_rate"] == pytest.approx(1 / 2) and empty["adjacent_repeat_rate"] == pytest.approx(1 / 2)
    assert empty["subword_hit_rate"] == 0 and empty["subword_hit_rate_utt"] == 0  # nothing to hit: misses
    # a transcription of punctuation only has tokens but no words: token coverage, no word coverage
    punct = keyword_metrics([dict(keywords=[12], text_tokens=[12], words=["..."])], VOCAB)
    assert punct["coverage"] == 1 and math.isnan(punct["word_coverage"])


def test_k_bins():
    assert [k_bin(k) for k in (0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 75)] == \
        ["0", "1-4", "1-4", "5-8", "5-8", "9-12", "9-12", "13-16", "13-16", "17+", "17+"]
    assert [b[0] for b in K_BINS] == ["0", "1-4", "5-8", "9-12", "13-16", "17+"]
    with pytest.raises(ValueError, match="-1"):
        k_bin(-1)

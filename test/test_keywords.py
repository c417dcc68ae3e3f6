"""Keyword metrics on small cases worked out by hand from the definitions in keywords.py."""
import math

import pytest

from speechclip_plus.eval.keywords import KeywordRecord, keyword_metrics, normalize_words

VOCAB = {1: "a</w>", 2: "dog</w>", 3: "run", 4: "ning</w>", 5: "s</w>", 6: "cat</w>", 7: "grass</w>",
         8: "the</w>", 9: "'s</w>"}


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

"""Chunked retrieval recall against a brute-force reference (full score matrix, sorting, Python loops)."""
import itertools

import pytest
import torch

from speechclip_plus.eval.retrieval import recall_at_k, retrieval_ranks, top_k_images


def brute_ranks(speech, images, s2i, ties):
    """0-based rank of each query's (best) positive in the full sorted candidate list. Among equal scores the
    positives go after the negatives (pessimistic) or before them (optimistic)."""
    scores = (speech.double() @ images.double().T).tolist()
    s2i = [int(x) for x in s2i]
    n_speech, n_img = len(scores), len(scores[0])
    after = ties == "pessimistic"

    def key(score, is_pos):
        return (-score, is_pos if after else not is_pos)

    speech_rank = []
    for n in range(n_speech):
        order = sorted(range(n_img), key=lambda m: key(scores[n][m], m == s2i[n]))
        speech_rank.append(order.index(s2i[n]))
    image_rank = []
    for m in range(n_img):
        order = sorted(range(n_speech), key=lambda n: key(scores[n][m], s2i[n] == m))
        image_rank.append(next(i for i, n in enumerate(order) if s2i[n] == m))
    return speech_rank, image_rank


def brute_recall(speech, images, s2i, ks, ties):
    sr, ir = brute_ranks(speech, images, s2i, ties)
    out = {}
    for k in ks:
        a = sum(r < k for r in sr) / len(sr)
        b = sum(r < k for r in ir) / len(ir)
        out.update({f"speech_to_image_r{k}": a, f"image_to_speech_r{k}": b, f"recall_mean_{k}": (a + b) / 2})
    return out


def make_data(seed, tied):
    """Images with 1 to 5 captions each. ``tied``: small integer vectors (exact scores, many ties) plus exact
    duplicate images and utterances; otherwise unit-norm Gaussian vectors."""
    g = torch.Generator().manual_seed(seed)
    n_img = 23
    caps = [[1, 5, 2, 3, 5, 1][i % 6] for i in range(n_img)]
    s2i = torch.tensor([m for m in range(n_img) for _ in range(caps[m])])
    if tied:
        images = torch.randint(-1, 2, (n_img, 4), generator=g).float()
        images[5] = images[4]  # duplicate images (both with several captions)
        images[12] = images[0]  # duplicate of a 1-caption image
        speech = images[s2i] + torch.randint(-1, 2, (len(s2i), 4), generator=g).float()
        speech[7] = speech[3]  # duplicate utterances of different images
        speech[10] = speech[9]
    else:
        images = torch.nn.functional.normalize(torch.randn(n_img, 16, generator=g), dim=1)
        speech = torch.nn.functional.normalize(images[s2i] + 0.9 * torch.randn(len(s2i), 16, generator=g), dim=1)
    perm = torch.randperm(len(s2i), generator=g)  # utterances not grouped by image
    return speech[perm], images, s2i[perm]


@pytest.mark.parametrize("seed,tied,ties", list(itertools.product([0, 1], [True, False],
                                                                    ["pessimistic", "optimistic"])))
def test_matches_brute_force_for_every_chunk_size(seed, tied, ties):
    speech, images, s2i = make_data(seed, tied)
    ks = (1, 2, 5, 10)
    want = brute_recall(speech, images, s2i, ks, ties)
    want_sr, want_ir = brute_ranks(speech, images, s2i, ties)
    assert 0 < want["recall_mean_5"] < 1  # a case that discriminates
    for chunk in (1, 3, 7, 16, 10_000, None):
        got = recall_at_k(speech, images, s2i, ks=ks, chunk_size=chunk, ties=ties)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-12), (chunk, key)
        sr, ir = retrieval_ranks(speech, images, s2i, max_rank=4, chunk_size=chunk, ties=ties)
        assert sr.tolist() == [min(r, 4) for r in want_sr]
        assert ir.tolist() == [min(r, 4) for r in want_ir]


def test_ties_make_a_difference_in_the_tied_data():
    speech, images, s2i = make_data(0, True)
    pess = recall_at_k(speech, images, s2i, ks=(1,))
    opt = recall_at_k(speech, images, s2i, ks=(1,), ties="optimistic")
    assert pess["speech_to_image_r1"] < opt["speech_to_image_r1"]


def test_hand_made_case():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # A, B, C
    speech = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    s2i = torch.tensor([0, 0, 1, 2])
    # speech ranks (>=): s0 0 | s1: B=1 and C=0 tie its A=0 -> 2 | s2 0 | s3: A .8, B .6 beat C -.8 -> 2
    # image ranks: A best positive 1 -> 0 | B .8, s1 scores 1 -> 1 | C -.8, s1 0 and s2 -.6 beat it -> 2
    got = recall_at_k(speech, images, s2i, ks=(1, 2, 3))
    want = {"speech_to_image_r1": 2 / 4, "speech_to_image_r2": 2 / 4, "speech_to_image_r3": 1.0,
            "image_to_speech_r1": 1 / 3, "image_to_speech_r2": 2 / 3, "image_to_speech_r3": 1.0}
    for key, value in want.items():
        assert got[key] == pytest.approx(value)
    assert got["recall_mean_1"] == pytest.approx((2 / 4 + 1 / 3) / 2)
    # optimistic: s1 only loses to B -> rank 1
    assert recall_at_k(speech, images, s2i, ks=(2,), ties="optimistic")["speech_to_image_r2"] == 0.75


def test_collapsed_embeddings_score_zero_at_one():
    speech, images = torch.ones(10, 3), torch.ones(5, 3)
    s2i = torch.arange(10) % 5
    got = recall_at_k(speech, images, s2i, ks=(1, 5))
    assert got["recall_mean_1"] == 0.0
    assert got["speech_to_image_r5"] == 1.0  # only 4 negatives
    assert got["image_to_speech_r5"] == 0.0  # 8 negatives tie


def test_top_k_images_matches_sorting():
    speech, images, _ = make_data(1, True)
    scores, idx = top_k_images(speech, images, k=5, chunk_size=6)
    full = (speech @ images.T).tolist()
    for n, row in enumerate(full):
        want = sorted(range(len(row)), key=lambda m: (-row[m], m))[:5]
        assert idx[n].tolist() == want
        assert scores[n].tolist() == [row[m] for m in want]


def test_bad_inputs_raise_clear_errors():
    speech, images = torch.randn(4, 3), torch.randn(3, 3)
    with pytest.raises(ValueError, match="no utterance"):
        recall_at_k(speech, images, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"speech2image\[2\] = 3"):
        recall_at_k(speech, images, torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match="dim"):
        recall_at_k(speech, torch.randn(3, 2), torch.tensor([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(speech, images, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        recall_at_k(speech, images, torch.tensor([0.0, 1.0, 2.0, 2.0]))
    bad = speech.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(bad, images, torch.tensor([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="ties"):
        recall_at_k(speech, images, torch.tensor([0, 1, 2, 2]), ties="random")


# ----------------------------------------------------------------------------------------------- chance levels
def brute_chance(s2i, k):
    """Expected recall@k both ways when the candidates come in a uniformly random order: the mean over every
    order of the candidates (exhaustive), which is what random scores without ties give."""
    s2i = [int(x) for x in s2i]
    n, m = len(s2i), max(s2i) + 1
    a = sum(sum(order.index(s2i[q]) < k for order in itertools.permutations(range(m))) for q in range(n))
    a /= n * len(list(itertools.permutations(range(m))))
    orders = list(itertools.permutations(range(n)))
    b = sum(sum(any(s2i[u] == img for u in order[:k]) for order in orders) for img in range(m))
    return a, b / (m * len(orders))


@pytest.mark.parametrize("s2i", [[0, 1, 2, 3], [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2], [0, 0, 0, 1, 2, 2, 3]])
def test_chance_recall_is_the_mean_over_random_orders(s2i):
    from speechclip_plus.eval.retrieval import chance_recall

    got = chance_recall(s2i, ks=(1, 2, 3, 10))
    for k in (1, 2, 3, 10):
        a, b = brute_chance(s2i, k)
        assert got[f"speech_to_image_r{k}"] == pytest.approx(a)
        assert got[f"image_to_speech_r{k}"] == pytest.approx(b)
        assert got[f"recall_mean_{k}"] == pytest.approx((a + b) / 2)
    names = ("speech_to_text", "text_to_speech")
    assert set(chance_recall(s2i, ks=(1,), names=names)) == {"speech_to_text_r1", "text_to_speech_r1",
                                                               "recall_mean_1"}


def test_constant_recalls_are_one_for_any_scores_and_the_others_are_not():
    from speechclip_plus.eval.retrieval import constant_recalls

    s2i = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])  # 4 images; an image query has 5 to 7 negatives
    ks = (1, 3, 4, 5, 7, 8)
    fixed = constant_recalls(s2i, ks=ks)
    assert fixed == ["speech_to_image_r4", "speech_to_image_r5", "speech_to_image_r7", "speech_to_image_r8",
                     "image_to_speech_r8", "recall_mean_8"]
    g = torch.Generator().manual_seed(0)
    seen_below_one = set()
    for _ in range(50):
        speech, images = torch.randn(8, 3, generator=g), torch.randn(4, 3, generator=g)
        got = recall_at_k(speech, images, s2i, ks=ks)
        assert all(got[key] == 1.0 for key in fixed)
        seen_below_one |= {key for key, v in got.items() if v < 1.0}
    assert seen_below_one == set(got) - set(fixed)


def test_selection_warning_names_the_metric_that_cannot_move():
    from speechclip_plus.eval.retrieval import selection_warning

    tiny = [0, 0, 1, 1, 2, 2]
    msg = selection_warning(tiny, "recall_mean_10", "data/dev")
    assert msg.startswith("data/dev: recall_mean_10 is 1.0 for any model (3 images, 6 utterances")
    assert "train.select_metric" in msg and "recall_mean_1" in msg
    assert selection_warning(tiny, "parallel/image_to_speech_r5", "data/dev") is not None  # branch prefix
    assert selection_warning(tiny, "recall_mean_1", "data/dev") is None
    assert selection_warning(tiny, "loss", "data/dev") is None
    assert selection_warning(list(range(11)), "recall_mean_10", "data/dev") is None  # 11 images: R@10 < 1

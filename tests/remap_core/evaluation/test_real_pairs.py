"""Real image pairs (OpenCV's graf, leuven, box): scoring against a hand count, and the shipped
model finding each photo's real partner among real distractor photos.

The pair photos in data/real_pairs/ are OpenCV sample data (Debian `opencv-doc`, Apache-2.0; graf
and leuven come from the Oxford affine-region sequences), downscaled to a long side of 512 and
saved as JPEG quality 90, so the test needs no download."""

import os

import numpy as np
import pytest

from remap_core.evaluation.real_pairs import REAL_PAIRS, pair_set, score_real_pairs

DATA = os.path.join(os.path.dirname(__file__), "data", "real_pairs")
SHIPPED_PAIRS = ("graf1.png", "graf3.png", "leuvenA.jpg", "leuvenB.jpg", "box.png",
                 "box_in_scene.png")


def shipped_files() -> dict[str, str]:
    return {f: os.path.join(DATA, os.path.splitext(f)[0] + ".jpg") for f in SHIPPED_PAIRS}


def test_scores_are_the_partners_rank_counted_by_hand():
    from PIL import Image

    blank = Image.new("RGB", (8, 8))
    files = shipped_files()
    pairs = pair_set({k: files[k] for k in ("graf1.png", "graf3.png")}, {"d1": blank, "d2": blank})
    assert pairs.names == ["graf1.png", "graf3.png", "d1", "d2"]
    assert pairs.pairs == [(0, 1, REAL_PAIRS[0][2])]
    # graf1's partner is second (d1 is closer); graf3's partner is first
    desc = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.8, 0.0, 0.6], [0.0, 0.0, 1.0]])
    res = score_real_pairs(desc, pairs)
    ranks = {r["query"]: r["rank"] for r in res["queries"]}
    assert ranks == {"graf1.png": 2, "graf3.png": 1}
    assert res["map"] == pytest.approx((1 / 2 + 1) / 2)
    assert res["recall_at_1"] == 0.5
    g1 = next(r for r in res["queries"] if r["query"] == "graf1.png")
    others = np.array([0.8, 0.0])                              # graf1 against d1, d2
    assert g1["gap"] == pytest.approx((0.6 - 0.8) / others.std())


def test_a_pair_with_a_missing_side_is_left_out_and_none_at_all_is_an_error():
    files = shipped_files()
    pairs = pair_set({k: files[k] for k in ("graf1.png", "graf3.png", "leuvenA.jpg")})
    assert len(pairs.pairs) == 1 and "leuvenA.jpg" not in pairs.names
    with pytest.raises(ValueError, match="no complete pair"):
        pair_set({"leuvenA.jpg": files["leuvenA.jpg"]})
    with pytest.raises(ValueError, match="descriptors for"):
        score_real_pairs(np.zeros((1, 4)), pairs)


def test_the_shipped_model_finds_each_real_partner_first_among_real_photos():
    """graf (viewpoint), leuven (light) and box/box_in_scene (clutter and occlusion): each side
    is a query over the pairs and the scikit-image / scikit-learn benchmark photos."""
    from remap_core.data.preprocess import resize_for_model
    from remap_core.descriptor.checkpoint import load_model
    from remap_core.evaluation.benchmark import benchmark_photos

    distractors = benchmark_photos("all", debian=False)
    pairs = pair_set(shipped_files(), distractors)
    assert len(pairs.pairs) == 3 and len(pairs.images) == 6 + len(distractors) >= 20
    model = load_model(None, device="cpu")
    side, multiple = model.config["max_side"], model.config["multiple"]
    desc = model.embed_arrays([resize_for_model(im, side, multiple) for im in pairs.images])
    res = score_real_pairs(desc, pairs)
    assert [r["rank"] for r in res["queries"]] == [1] * 6, res["queries"]
    assert min(r["gap"] for r in res["queries"]) > 0

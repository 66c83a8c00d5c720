"""The view-family benchmark and `remap eval` on a tiny offline configuration."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from remap_core.evaluation import evaluate
from remap_core.evaluation.benchmark import (benchmark_photos, build_benchmark, photo_catalogue,
                                  photo_split)
from remap_core.data.views import NUISANCES


def test_train_and_eval_photos_are_disjoint_and_cover_all_photos():
    names = list(photo_catalogue(debian=False))
    train = [n for n in names if photo_split(n) == "train"]
    evalp = [n for n in names if photo_split(n) == "eval"]
    assert len(train) >= 5 and len(evalp) >= 5 and not set(train) & set(evalp)
    got = benchmark_photos("train", debian=False, max_side=32, max_photos=2)
    assert list(got) == train[:2]
    assert all(max(im.size) <= 32 and im.mode == "RGB" for im in got.values())
    with pytest.raises(ValueError, match="split"):
        benchmark_photos("test")


def test_benchmark_is_deterministic_cached_and_has_family_ground_truth(tmp_path):
    kw = dict(cache_dir=str(tmp_path), views_per_nuisance=1, side=64, debian=False, max_photos=3)
    a = build_benchmark("eval", **kw)
    assert len(list(tmp_path.glob("benchmark-eval-*/index.json"))) == 1
    b = build_benchmark("eval", **kw)                       # read back from the cache
    fresh = build_benchmark("eval", **{**kw, "cache_dir": None})
    assert len(a.images) == 3 * (1 + len(NUISANCES))
    for x, y, z in zip(a.images, b.images, fresh.images):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    q = a.queries
    assert len(q) == 3 * len(NUISANCES) and all(a.nuisance[i] != "original" for i in q)
    gt = a.ground_truth()
    for i, g in zip(q, gt):
        assert i not in g["ok"] and list(g["junk"]) == [i]
        assert len(g["ok"]) == len(NUISANCES) and (a.family[g["ok"]] == a.family[i]).all()
    pairs = a.matching_pairs()
    assert len(pairs) == 3 * 6 * 5 // 2 and (a.family[pairs[:, 0]] == a.family[pairs[:, 1]]).all()
    neg = a.non_matching_pairs(n=10)
    assert len(neg) == 10 and (a.family[neg[:, 0]] != a.family[neg[:, 1]]).all()


def _fake_stamps(root):
    """A tuxpaint-like stamps folder: two classes of 3 RGBA stamps, one class of 1."""
    rng = np.random.RandomState(0)
    for cls, n, colour in [("animals/birds", 3, (200, 30, 30)), ("food/fruit", 3, (30, 200, 30)),
                           ("space/planets", 1, (0, 0, 200))]:
        for i in range(n):
            folder = root / cls / ("sub" if i == 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            rgba = np.zeros((40, 50, 4), np.uint8)
            rgba[10:30, 10 + i:40, :3] = colour
            rgba[10:30, 10 + i:40, 3] = 255
            rgba[..., :3] += rng.randint(0, 20, (40, 50, 3)).astype(np.uint8)
            Image.fromarray(rgba, "RGBA").save(folder / f"s{i}.png")
    return root


def test_category_benchmark_uses_two_level_folders_as_classes(tmp_path):
    from remap_core.evaluation.benchmark import category_benchmark

    root = _fake_stamps(tmp_path / "stamps")
    b = category_benchmark(None, min_per_class=2, root=str(root))
    assert b.photos == ["animals/birds", "food/fruit"]          # planets: too few
    assert len(b.images) == 6 and list(b.family) == [0, 0, 0, 1, 1, 1]
    assert len(b.queries) == 6 and "classes" in b.summary()
    np.testing.assert_array_equal(b.images[0][0, 0], [255, 255, 255])   # alpha on white
    assert sorted(b.ground_truth()[0]["ok"]) == [1, 2]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    from remap_core.evaluation import benchmark

    cache = tmp_path_factory.mktemp("cache")
    stamps = _fake_stamps(tmp_path_factory.mktemp("stamps"))
    fake = benchmark.category_benchmark(None, min_per_class=2, root=str(stamps))
    args = evaluate.EvalOptions(cache=str(cache), no_debian=True, max_photos=2, category=True,
                                views_per_nuisance=1, side=96, max_side=64, scales="1,1/2",
                                whiten_dim=8, save_model=str(cache / "remap.pt"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(benchmark, "category_benchmark", lambda *a, **k: fake)
        return evaluate.run(args), args, cache


def test_eval_reports_every_method_per_nuisance(tiny_report):
    report, _, _ = tiny_report
    names = list(report["results"])
    for expected in ("MAC", "SPoC", "GeM", "R-MAC", "REMAP"):
        assert expected in names
    for r in report["results"].values():
        assert set(r["per_nuisance"]) == set(NUISANCES)
        assert 0 < r["mAP"] <= 1 and 0 <= r["R@10"] <= 1
    assert report["results"]["REMAP"]["dim"] == 8
    assert set(report["klw_weights"]) == {"stage5", "head"}
    table = evaluate.format_table(report)
    assert "R-MAC + Lw" in table and "REMAP vs R-MAC + Lw" in table
    assert report["results"]["R-MAC"]["vs R-MAC"]["dmAP"] == 0
    cat = report["category"]
    assert cat["classes"] == ["animals/birds", "food/fruit"]
    assert set(cat["results"]) == set(report["results"])
    assert "Category retrieval" in table
    json.dumps(report)


def test_eval_scores_equal_an_independent_embedding_of_the_same_images(tiny_report):
    """The shared-backbone path must give what `RetrievalNet.embed_arrays` gives."""
    from PIL import Image

    from remap_core.descriptor.checkpoint import load_model
    from remap_core.evaluation.metrics import compute_map, rank_by_similarity
    from remap_core.descriptor.model import build_model
    from remap_core.data.preprocess import resize_for_model

    report, args, cache = tiny_report
    bench = build_benchmark("eval", cache_dir=str(cache), views_per_nuisance=1, side=96,
                            debian=False, max_photos=2)
    images = [resize_for_model(Image.fromarray(im), 64) for im in bench.images]
    q = bench.queries
    for name, model in [("MAC", build_model({"head": "mac", "max_side": 64,
                                              "scales": [1, 0.5]})),
                        ("REMAP", load_model(str(cache / "remap.pt"), device="cpu"))]:
        torch.manual_seed(0)
        desc = model.embed_arrays(images)
        m, *_ = compute_map(rank_by_similarity(desc[q], desc), bench.ground_truth(q))
        assert m == pytest.approx(report["results"][name]["mAP"], abs=1e-6), name


def test_eval_scores_saved_checkpoints_against_the_first_one(tiny_report, tmp_path):
    import shutil

    report, args, cache = tiny_report
    for folder in ("init", "trained"):
        (tmp_path / folder).mkdir()
        shutil.copy(cache / "remap.pt", tmp_path / folder / "model.pt")
    args = dataclasses.replace(args, category=False, save_model=None,
                               model=[str(tmp_path / "init" / "model.pt"),
                                      str(tmp_path / "trained" / "model.pt")])
    again = evaluate.run(args)
    for name in ("init/model.pt", "trained/model.pt"):
        r = again["results"][name]
        # the saved REMAP, embedded as the product embeds it, scores what its row scored
        assert r["mAP"] == pytest.approx(report["results"]["REMAP"]["mAP"], abs=1e-6)
        assert r["fingerprint"].startswith("efficientnet_lite0.remap.d8.")
    c = again["key_comparisons"]["trained/model.pt vs init/model.pt"]
    assert c["dmAP"] == 0 and c["ci95"] == [0, 0]
    assert "trained/model.pt vs init/model.pt" in evaluate.format_table(again)

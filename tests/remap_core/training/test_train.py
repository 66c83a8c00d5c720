import json

import numpy as np
import pytest
import torch
from PIL import Image

from remap_core.descriptor.checkpoint import load_model, read_checkpoint
from remap_core.descriptor.model import build_model
from remap_core.training.train import (TrainOptions, embed_images, freeze_backbone, resume_training,
                              train)

CONFIG = {"head": "remap", "taps": ["stage7", "head"], "whiten_dim": 16, "max_side": 64,
          "scales": [1.0]}
OPTS = dict(epochs=1, tuples_per_epoch=4, negatives=2, batch_tuples=2, freeze=15, seed=3,
            lr=1e-4, lr_head=1e-2, lr_whiten=1e-3)


def _images(n_classes=5, per_class=3, seed=0):
    """Tiny synthetic 'landmarks': a random texture per class, seen with brightness changes."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(n_classes):
        base = rng.integers(0, 255, size=(48, 64, 3)).astype(np.float32)
        for _ in range(per_class):
            images.append(np.clip(base * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8))
            labels.append(c)
    return images, np.array(labels)


def _write_class_folders(root, images, labels):
    """The labelled layout `remap train --data` reads: root/c<label>/<i>.png."""
    for i, (im, lab) in enumerate(zip(images, labels)):
        (root / f"c{lab}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / f"c{lab}" / f"{i}.png")


def _write_photos(root, images):
    """Unlabelled photos for `remap train --photos`: root/<i>.png at 128 x 96."""
    root.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).resize((128, 96)).save(root / f"{i}.png")


@pytest.fixture(scope="module")
def data():
    return _images()


def test_freeze_leaves_only_the_last_units_trainable():
    model = build_model(CONFIG)
    assert freeze_backbone(model, 15) == 3            # stem + 16 blocks + conv head = 18 units
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())
    assert not any(p.requires_grad for p in model.backbone.blocks[13].parameters())
    assert all(p.requires_grad for p in model.backbone.blocks[14].parameters())
    with pytest.raises(ValueError, match="exceeds"):
        freeze_backbone(model, 99)


def test_training_logs_checkpoints_and_resumes(tmp_path, data):
    images, labels = data
    torch.manual_seed(0)
    model = build_model(CONFIG)
    klw_before = model.head.region_weights.detach().clone()
    calls = []

    def validate(m):
        calls.append(1)
        return {"map": np.float64(len(calls))}       # numpy scalars, as metrics return

    opts = TrainOptions(**OPTS)
    history = train(model, images, labels, opts, str(tmp_path), validate=validate,
                    progress=False)
    assert [r["epoch"] for r in history] == [0, 1] and history[1]["map"] == 2.0
    assert history[1]["loss"] >= 0 and 0 <= history[1]["active"] <= 1
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == history
    # KLW moved and stays non-negative
    klw_after = model.head.region_weights.detach()
    assert not torch.equal(klw_before, klw_after) and (klw_after >= 0).all()
    # the checkpoint is a plain model checkpoint for load_model, with the same embeddings
    loaded = load_model(str(tmp_path / "last.pt"), device="cpu")
    np.testing.assert_allclose(embed_images(loaded, images[:4]), embed_images(model, images[:4]),
                               atol=1e-5)
    # resume: epoch 2 continues from the stored optimiser state and appends to the log
    model2, optimizer, state = resume_training(str(tmp_path / "last.pt"), torch.device("cpu"))
    assert state["epoch"] == 1
    assert len(optimizer.state) > 0
    opts2 = TrainOptions(**{**OPTS, "epochs": 2})
    history2 = train(model2, images, labels, opts2, str(tmp_path), validate=validate,
                     optimizer=optimizer, start_epoch=2, history=state["history"],
                     progress=False)
    assert [r["epoch"] for r in history2] == [0, 1, 2]
    assert read_checkpoint(str(tmp_path / "last.pt"))["extra"]["train_state"]["epoch"] == 2


def test_training_is_deterministic_for_a_seed(tmp_path, data):
    images, labels = data
    out = []
    for run in range(2):
        torch.manual_seed(0)
        model = build_model(CONFIG)
        train(model, images, labels, TrainOptions(**OPTS), str(tmp_path / str(run)),
              progress=False)
        out.append(embed_images(model, images))
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)


def test_resume_refuses_a_checkpoint_without_training_state(tmp_path):
    from remap_core.descriptor.checkpoint import save_checkpoint

    save_checkpoint(build_model(CONFIG), str(tmp_path / "plain.pt"))
    with pytest.raises(ValueError, match="without training state"):
        resume_training(str(tmp_path / "plain.pt"), torch.device("cpu"))


def test_initialisation_sets_klw_from_pairs_and_a_pca_whitening(data):
    from remap_core.training.train import initialise_klw, initialise_whitening, pooled_descriptors

    images, labels = data
    model = build_model({**CONFIG, "whiten_dim": None})
    w = initialise_klw(model, images, labels, n_pairs=12, rng=np.random.default_rng(0))
    assert w.shape == tuple(model.head.region_weights.shape) and (w >= 0).all()
    np.testing.assert_allclose(model.head.region_weights.detach().numpy(),
                               np.maximum(w, 1e-6), rtol=1e-4)
    initialise_whitening(model, images, labels, dim=8, kind="pca")
    assert model.dim == 8 and model.config["whiten_dim"] == 8
    with torch.no_grad():
        y = model.whiten(torch.from_numpy(pooled_descriptors(model, images)).float()).numpy()
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(8), atol=1e-3)


def test_frozen_trunk_cache_gives_the_model_s_own_features(data):
    from remap_core.training.train import FrozenTrunkCache

    images, _ = data
    model = build_model({**CONFIG, "taps": ["stage5", "stage7", "head"]})
    model.eval()
    freeze_backbone(model, 13)
    cache = FrozenTrunkCache(model, images, 13)
    with torch.no_grad():
        ref = model.features(torch.from_numpy(np.stack(images[:3])).permute(0, 3, 1, 2).float())
        got = cache.features([0, 1, 2])
    assert len(got) == 3
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(embed_images(model, images[:5], cache=cache),
                               embed_images(model, images[:5]), atol=1e-5)


def test_cached_embedder_matches_the_model_s_multiscale_embedding(data):
    from remap_core.training.train import CachedEmbedder

    images, _ = data
    model = build_model({**CONFIG, "scales": [1.0, 0.75]}).eval()
    freeze_backbone(model, 14)
    embed = CachedEmbedder(model, images[:4], 14)
    np.testing.assert_allclose(embed(model), model.embed_arrays(images[:4]), atol=1e-5)


def test_remap_train_reports_an_unreadable_layout_and_a_missing_resume(tmp_path, capsys):
    from remap_cli import main

    (tmp_path / "labels.csv").write_text("name,score\na.jpg,1\n")
    rc = main(["train", "--data", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "run"),
               "--no-val", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no URI column" in err and "a folder with one sub-folder" in err
    rc = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--resume"])
    assert rc == 2 and "--resume but" in capsys.readouterr().err


def test_remap_train_end_to_end_on_a_folder_layout_gives_a_loadable_model(tmp_path):
    from remap_cli import main

    images, labels = _images(n_classes=4, per_class=3, seed=5)
    _write_class_folders(tmp_path / "data", images, labels)
    rc = main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
               "--taps", "stage7,head", "--max-side", "64", "--scales", "1", "--whiten-dim", "8",
               "--klw-pairs", "10", "--epochs", "1", "--tuples", "2", "--batch", "2",
               "--negatives", "2", "--freeze", "15", "--no-val", "--quiet"])
    assert rc == 0
    model = load_model(str(tmp_path / "run" / "model.pt"), device="cpu")
    assert model.config["head"] == "remap" and model.dim == 8
    log = [json.loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]
    assert load_model(str(tmp_path / "run" / "init.pt"), device="cpu").dim == 8


def test_remap_train_on_tiles_of_unlabelled_photos(tmp_path, capsys):
    from remap_cli import main

    images, _ = _images(n_classes=3, per_class=1, seed=8)
    _write_photos(tmp_path / "photos", images)
    rc = main(["train", "--photos", str(tmp_path / "photos"), "--tiles", "2",
               "--views-per-photo", "1", "--out", str(tmp_path / "run"), "--taps", "stage7,head",
               "--max-side", "64", "--scales", "1", "--whiten-dim", "8", "--klw-pairs", "10",
               "--epochs", "1", "--tuples", "2", "--batch", "2", "--negatives", "2",
               "--freeze", "15", "--no-val", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    # 3 photos x 4 tiles = 12 classes of (tile + 1 view)
    assert "cut into 2x2 tiles (12 classes)" in out and "24 images in 12 classes" in out
    assert load_model(str(tmp_path / "run" / "model.pt"), device="cpu").dim == 8


def test_a_trained_checkpoint_works_unchanged_in_embed_index_and_search(tmp_path, sample_dir):
    from remap_core.descriptor.checkpoint import model_fingerprint
    from remap_cli import main
    from index_builder.search import open_index

    images, labels = _images(n_classes=3, per_class=2, seed=9)
    _write_class_folders(tmp_path / "data", images, labels)
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                 "--taps", "stage7,head", "--max-side", "64", "--scales", "1",
                 "--whiten-dim", "4", "--klw-pairs", "5", "--epochs", "1", "--tuples", "2",
                 "--batch", "2", "--negatives", "1", "--freeze", "15", "--no-val",
                 "--quiet"]) == 0
    ckpt = str(tmp_path / "run" / "model.pt")
    store, index = tmp_path / "store", tmp_path / "index"
    assert main(["embed", "--input", str(sample_dir / "images" / "c*.jpg"), "--output",
                 str(store), "--model", ckpt]) == 0
    assert main(["index", "--embeddings", str(store), "--output", str(index)]) == 0
    idx = open_index(str(index))
    assert idx.manifest["model"] == model_fingerprint(load_model(ckpt, "cpu"))
    assert idx.manifest["dimension"] == 4
    query = str(sample_dir / "queries" / "coffee__bright.jpg")
    hits = idx.search_images([query], k=3, model_uri=ckpt)[0]
    assert len(hits) == 3 and all(h.uri.endswith(".jpg") for h in hits)
    assert main(["search", "--index", str(index), "--model", ckpt, query]) == 0


def test_remap_train_on_benchmark_views_tiles_the_train_split_photos(tmp_path, capsys):
    from remap_cli import main

    rc = main(["train", "--benchmark-views", "--no-debian", "--max-photos", "3", "--tiles", "2",
               "--views-per-photo", "1", "--cache", str(tmp_path / "cache"),
               "--out", str(tmp_path / "run"), "--taps", "stage7,head", "--max-side", "64",
               "--scales", "1", "--whiten-dim", "8", "--klw-pairs", "10", "--epochs", "1",
               "--tuples", "2", "--batch", "2", "--negatives", "2", "--freeze", "15", "--no-val",
               "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert ("3 training photos (benchmark train split + 0 training-only photos) cut into "
            "2x2 tiles (12 classes)") in out
    trained = read_checkpoint(str(tmp_path / "run" / "model.pt"))["extra"]["trained"]
    assert "12 classes" in trained["source"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["tiles"] == 2 and run["clutter_backgrounds"] == 16


def test_the_final_model_weighs_the_whole_map_and_refits_its_whitening(tmp_path):
    """model.pt is last.pt after the final step: the whole-map weight x the grid's mean and a
    PCA whitening refitted on the trained descriptors; --resume on a finished run writes it
    again with other final options, and 'keep' with a negative weight gives last.pt back."""
    from remap_cli import main

    images, labels = _images(n_classes=4, per_class=3, seed=6)
    _write_class_folders(tmp_path / "data", images, labels)
    args = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
            "--taps", "stage7,head", "--max-side", "64", "--scales", "1", "--whiten-dim", "8",
            "--klw-pairs", "10", "--epochs", "1", "--tuples", "2", "--batch", "2",
            "--negatives", "2", "--freeze", "15", "--no-val", "--quiet"]
    assert main(args + ["--whole-map-weight", "7"]) == 0
    last = load_model(str(tmp_path / "run" / "last.pt"), device="cpu")
    final = load_model(str(tmp_path / "run" / "model.pt"), device="cpu")
    w_last = last.head.region_weights.detach().numpy()
    w_final = final.head.region_weights.detach().numpy()
    np.testing.assert_allclose(w_final[:, 0], 7 * w_last[:, 1:].mean(axis=1), rtol=1e-4)
    np.testing.assert_allclose(w_final[:, 1:], w_last[:, 1:], rtol=1e-5)
    assert not torch.allclose(final.whiten.weight, last.whiten.weight)
    # the refitted whitening whitens the training descriptors: zero mean, unit variance
    from remap_core.data.preprocess import resize_for_model
    from remap_core.training.train import pooled_descriptors

    seen = [resize_for_model(Image.fromarray(im), 64, 32) for im in images]   # as trained on
    x = final.whiten(torch.from_numpy(pooled_descriptors(final, seen)).float()).detach().numpy()
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-3)
    np.testing.assert_allclose(x.var(axis=0, ddof=1), 1, rtol=1e-3)   # PCA: N - 1
    record = read_checkpoint(str(tmp_path / "run" / "model.pt"))["extra"]["trained"]["final"]
    assert record == {"epoch": "final", "whole_map_weight": 7.0, "final_whitening": "pca"}
    # --resume on the finished run: the final step again, here undone
    assert main(args + ["--resume", "--whole-map-weight", "-1", "--final-whiten", "keep"]) == 0
    again = load_model(str(tmp_path / "run" / "model.pt"), device="cpu")
    np.testing.assert_allclose(embed_images(again, images), embed_images(last, images),
                               atol=1e-6)
    log = [json.loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]                  # no epoch was trained again


def test_whole_map_at_init_weighs_the_whole_map_before_training(tmp_path, capsys):
    """--whole-map-at-init: init.pt (KLW from pairs, then the whole map x the grid's mean, then
    the whitening fitted on that weighting) is what training starts from."""
    from remap_cli import main

    images, labels = _images(n_classes=4, per_class=3, seed=7)
    _write_class_folders(tmp_path / "data", images, labels)
    args = ["train", "--data", str(tmp_path / "data"), "--taps", "stage7,head", "--max-side",
            "64", "--scales", "1", "--whiten-dim", "8", "--klw-pairs", "10", "--epochs", "1",
            "--tuples", "2", "--batch", "2", "--negatives", "2", "--freeze", "15", "--no-val",
            "--quiet", "--whole-map-weight", "5"]
    assert main(args + ["--out", str(tmp_path / "a"), "--whole-map-at-init"]) == 0
    assert "whole-map region weighed 5 x the grid's mean before training" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    w_at = load_model(str(tmp_path / "a" / "init.pt"), device="cpu").head.region_weights
    w_kl = load_model(str(tmp_path / "b" / "init.pt"), device="cpu").head.region_weights
    w_at, w_kl = w_at.detach().numpy(), w_kl.detach().numpy()
    np.testing.assert_allclose(w_at[:, 1:], w_kl[:, 1:], rtol=1e-5)     # the same KL grid
    np.testing.assert_allclose(w_at[:, 0], 5 * w_at[:, 1:].mean(axis=1), rtol=1e-4)
    assert not np.allclose(w_at[:, 0], w_kl[:, 0], rtol=1e-3)
    assert main(args + ["--out", str(tmp_path / "c"), "--whole-map-at-init", "--head", "gem",
                        "--taps", "head"]) == 2
    assert "--whole-map-at-init needs a REMAP head" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()                  # refused before anything was written


def test_the_final_model_s_validation_record_loads_with_the_checkpoint(tmp_path, monkeypatch):
    """Validation returns numpy scalars; the final record stored in model.pt must still load
    (torch.load weights_only refuses numpy objects)."""
    from remap_cli import main
    from remap_core.training import run

    monkeypatch.setattr(run, "make_validator",
                        lambda *a, **k: (lambda m: {"map": np.float64(0.25)}))
    images, labels = _images(n_classes=3, per_class=2, seed=4)
    _write_class_folders(tmp_path / "data", images, labels)
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                 "--taps", "stage7,head", "--max-side", "64", "--scales", "1",
                 "--whiten-dim", "4", "--klw-pairs", "5", "--epochs", "1", "--tuples", "2",
                 "--batch", "2", "--negatives", "1", "--freeze", "15", "--quiet"]) == 0
    final = read_checkpoint(str(tmp_path / "run" / "model.pt"))["extra"]["trained"]["final"]
    assert final["map"] == 0.25 and type(final["map"]) is float
    assert load_model(str(tmp_path / "run" / "model.pt"), device="cpu").dim == 4


def test_resume_refuses_another_seed_whose_views_would_differ(tmp_path, capsys):
    """The generated views derive from --seed: resuming (or re-finalising) a run with another
    seed would train or refit on other images, so it is refused."""
    from remap_cli import main

    images, _ = _images(n_classes=3, per_class=1, seed=8)
    _write_photos(tmp_path / "photos", images)
    args = ["train", "--photos", str(tmp_path / "photos"), "--tiles", "2",
            "--views-per-photo", "1", "--out", str(tmp_path / "run"), "--taps", "stage7,head",
            "--max-side", "64", "--scales", "1", "--whiten-dim", "8", "--klw-pairs", "10",
            "--epochs", "1", "--tuples", "2", "--batch", "2", "--negatives", "2",
            "--freeze", "15", "--no-val", "--quiet"]
    assert main(args + ["--seed", "3"]) == 0
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    assert "seed: 3 -> 0" in capsys.readouterr().err
    assert main(args + ["--resume", "--seed", "3"]) == 0


def test_fresh_views_draw_new_views_of_the_same_classes_each_epoch(tmp_path, capsys):
    """--fresh-views: epoch 1 trains on load_training_set's draw, every later epoch on a draw of
    its own (same classes and order, other pixels), reproducibly; a labelled layout is refused."""
    from remap_cli import main
    from remap_core.training.run import TrainRun, epoch_views, family_photos, load_training_set

    images, labels = _images(n_classes=3, per_class=1, seed=8)
    _write_photos(tmp_path / "photos", images)
    options = TrainRun(out=str(tmp_path / "run"), photos=str(tmp_path / "photos"),
                       views_per_photo=2, fresh_views=True, quiet=True)
    first, source = load_training_set(options, 64)
    assert "new views every epoch" in source
    draw = epoch_views(options, 64)
    again = draw(1)
    assert all(np.array_equal(a, b) for a, b in zip(first.images, again.images))
    second = draw(2)
    np.testing.assert_array_equal(second.labels, first.labels)
    np.testing.assert_array_equal(second.groups, first.groups)
    originals = [i for i, s in enumerate(first.sources) if s.endswith("#original")]
    views = [i for i in range(len(first.images)) if i not in originals]
    assert all(np.array_equal(first.images[i], second.images[i]) for i in originals)
    assert not any(np.array_equal(first.images[i], second.images[i]) for i in views)
    assert all(np.array_equal(a, b) for a, b in zip(second.images, draw(2).images))
    # the photos read once (as `remap train` does) give the same draws as reading them again
    family = family_photos(options)
    once, once_source = load_training_set(options, 64, family=family)
    assert once_source == source
    assert all(np.array_equal(a, b) for a, b in zip(first.images, once.images))
    assert all(np.array_equal(a, b)
               for a, b in zip(second.images, epoch_views(options, 64, family=family)(2).images))

    args = ["train", "--photos", str(tmp_path / "photos"), "--tiles", "2", "--fresh-views",
            "--views-per-photo", "1", "--out", str(tmp_path / "run"), "--taps", "stage7,head",
            "--max-side", "64", "--scales", "1", "--whiten-dim", "8", "--klw-pairs", "10",
            "--epochs", "2", "--tuples", "2", "--batch", "2", "--negatives", "2",
            "--freeze", "12", "--no-val", "--quiet"]
    assert main(args) == 0, capsys.readouterr()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert "views_s" not in log[0] and log[1]["views_s"] >= 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["fresh_views"] is True
    capsys.readouterr()
    assert main([a for a in args if a != "--fresh-views"] + ["--resume"]) == 2
    assert "fresh_views: True -> False" in capsys.readouterr().err

    _write_class_folders(tmp_path / "data", images, labels)
    assert main(["train", "--data", str(tmp_path / "data"), "--fresh-views",
                 "--out", str(tmp_path / "run2"), "--no-val", "--quiet"]) == 2
    assert "labelled layout (--data) has no views" in capsys.readouterr().err

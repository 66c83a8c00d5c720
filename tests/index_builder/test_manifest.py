"""The index manifest: written last via a temporary name, checksums of every file verified."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from index_builder.manifest import (FORMAT_VERSION, MANIFEST_NAME, file_entry, read_manifest,
                                    verify_files, write_manifest)


def test_manifest_is_written_via_a_temporary_name_and_read_back(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    entry = file_entry(str(tmp_path), "a.bin")
    assert entry == {"path": "a.bin", "bytes": 1000,
                     "sha256": hashlib.sha256(b"x" * 1000).hexdigest()}
    write_manifest(str(tmp_path), {"index_files": [entry]})
    assert sorted(os.listdir(tmp_path)) == ["a.bin", MANIFEST_NAME]  # no .tmp left behind
    m = read_manifest(str(tmp_path))
    assert m["format_version"] == FORMAT_VERSION == 2 and m["index_files"] == [entry]
    verify_files(str(tmp_path), m["index_files"])


def test_missing_changed_or_foreign_files_are_refused_with_what_to_do(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    entry = file_entry(str(tmp_path), "a.bin")
    (tmp_path / "a.bin").write_bytes(b"abd")
    with pytest.raises(ValueError, match="checksum.*copy or rebuild"):
        verify_files(str(tmp_path), [entry])
    os.remove(tmp_path / "a.bin")
    with pytest.raises(FileNotFoundError, match="missing"):
        verify_files(str(tmp_path), [entry])
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="rebuild or upgrade"):
        read_manifest(str(tmp_path))

"""bench/sampling.py: the training sample drawn the way it was before and the way it is now
keeps the same rows."""

import json

from script_modules import load_bench

sampling = load_bench("sampling")


def test_before_and_now_keep_the_same_rows(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert sampling.main(["--n", "50000", "--dim", "8", "--size", "3000", "--batch-rows", "1000",
                          "--repeats", "1", "--output", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["same_sample"] is True and lines[-1]["bench"] == "sampling"

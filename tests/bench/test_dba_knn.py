"""bench/dba_knn.py on a small size: both searches run, the recall over all rows is that of the
approximate neighbours against exact ones, and the report names its figures."""

import json

from script_modules import load_bench


def test_dba_knn_bench_reports_both_searches_and_their_recall(tmp_path, capsys):
    mod = load_bench("dba_knn")
    out = tmp_path / "r.jsonl"
    (r,) = mod.main(["--sizes", "4000", "--dim", "16", "--output", str(out)])
    assert r["n"] == 4000 and r["approx_factory"].startswith("IVF")
    assert 0.8 <= r["recall_all_rows"] <= 1.0 and r["exact_seconds"] > 0
    assert abs(r["recall_sampled"] - r["recall_all_rows"]) < 0.06
    assert json.loads(out.read_text().splitlines()[-1]) == r
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == r

"""bench/ivf_assignment.py on a small size: one trained index refilled per add-time efSearch; a
wide enough search files every vector in its exact list, and the report names its figures."""

import json

from script_modules import load_bench


def test_ivf_assignment_bench_counts_each_vector_s_list_and_the_baseline_ratio(tmp_path, capsys):
    mod = load_bench("ivf_assignment")
    out = tmp_path / "r.jsonl"
    rows = mod.main(["--n", "12000", "--dim", "32", "--clusters", "300", "--nlist", "1024",
                     "--queries", "100", "--add-ef", "16,512", "--nprobe", "1,8",
                     "--output", str(out)])
    assert [r["add_ef"] for r in rows] == [16, 512]
    assert rows[0]["add_time_ratio"] == 1.0
    assert rows[1]["exact_list_share"] == 1.0            # the whole graph: exact assignment
    assert 0.5 <= rows[0]["exact_list_share"] <= 1.0
    for r in rows:
        assert 0.0 <= r["recall@10"][1] <= r["recall@10"][8] <= 1.0
    summary = json.loads(out.read_text().splitlines()[-1])
    assert summary["factory"] == "IVF1024_HNSW32,Flat" and summary["n"] == 12000
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == summary

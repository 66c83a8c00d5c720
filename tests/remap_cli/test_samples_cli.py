"""`remap samples` refuses an --output that is a file, in one line, writing nothing."""

from __future__ import annotations

from remap_cli import main


def test_samples_output_that_is_a_file_is_refused_and_left_alone(tmp_path, capsys):
    target = tmp_path / "samples"
    target.write_text("keep me")
    for out, where in ((target, "is a file"),
                       (target / "deeper", f"lies under {target}, which is a file")):
        rc = main(["samples", "--output", str(out)])
        err = capsys.readouterr().err
        assert rc == 2
        assert err.strip() == (f"remap samples: error: --output {out} {where}; pass a folder "
                               f"to write the samples into")
    assert target.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["samples"]

"""`remap embed` at the console: what it refuses before anything starts."""

import remap_cli


def test_a_misspelt_option_is_refused_before_anything_is_written(tmp_path, sample_dir, capsys):
    store = tmp_path / "store"
    rc = remap_cli.main(["embed", "--input", str(sample_dir / "images"), "--output", str(store),
                         "--break_leas", "--runer=DirectRunner"])
    err = capsys.readouterr().err
    assert rc == 2 and "--break_leas" in err and "--runer" in err and "spelling" in err
    assert not store.exists()


def test_beam_and_remap_options_are_known():
    from pipelines.options import unknown_options

    assert unknown_options(["--input=x", "--output", "y", "--break_lease", "--runner",
                            "DirectRunner", "--direct_num_workers=2", "--job_endpoint=l:1",
                            "--environment_type=LOOPBACK", "--torch_threads", "2",
                            "--experiments=a", "--experiments=b"]) == []
    assert unknown_options(["--input=x", "--torch_thread=2", "--lease_minute", "3"]) == \
        ["--torch_thread", "--lease_minute"]

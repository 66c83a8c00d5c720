"""Device choice is explicit (remap_core/descriptor/devices.py): a GPU asked for where there is
none is one clear error, at the console too; the CPU path of the GPU code (pinned-memory
transfer, memory-sized batches) gives the same descriptors; bench/gpu_embed.py runs on the CPU
at a tiny size and says that it did."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import remap_cli
from remap_core.descriptor.devices import memory_batch_size, resolve_device, to_device

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def test_cpu_is_used_when_asked():
    assert resolve_device("cpu") == "cpu"


@no_gpu
def test_default_device_is_the_cpu_without_a_gpu():
    assert resolve_device(None) == "cpu" and resolve_device("auto") == "cpu"


@no_gpu
def test_cuda_without_a_gpu_is_refused_saying_what_to_pass():
    with pytest.raises(ValueError, match="no CUDA GPU is visible.*pass --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda:1")


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="not a device torch knows"):
        resolve_device("gpu0")


@no_gpu
def test_embed_with_device_cuda_without_a_gpu_exits_2_before_anything_runs(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    import image_cases

    (tmp_path / "in" / "a.jpg").write_bytes(image_cases.jpeg())
    status = remap_cli.main(["embed", f"--input={tmp_path / 'in'}",
                             f"--output={tmp_path / 'store'}", "--device=cuda"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("remap embed: error: --device cuda but no CUDA GPU is visible")
    assert not (tmp_path / "store").exists()


def test_transfer_and_batch_sizing_on_the_cpu_keep_values_and_request(tiny_model_path):
    from remap_core.descriptor.checkpoint import load_model

    batch = np.random.default_rng(0).integers(0, 256, (3, 64, 48, 3), dtype=np.uint8)
    moved = to_device(batch, torch.device("cpu"))
    assert moved.dtype == torch.uint8 and np.array_equal(moved.numpy(), batch)
    model = load_model(tiny_model_path, device="cpu")
    assert memory_batch_size(model, 64, 64, 17) == 17
    with pytest.raises(ValueError):
        memory_batch_size(model, 64, 64, 0)
    # descriptors do not depend on how the images are split into forward passes
    images = list(batch)
    one = model.embed_arrays(images, batch_size=1)
    np.testing.assert_allclose(model.embed_arrays(images, batch_size=3), one, atol=1e-5)


def test_gpu_bench_runs_on_the_cpu_at_a_tiny_size_and_says_so(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
    import gpu_embed

    result = gpu_embed.main(["--device", "cpu", "--images", "12", "--distinct", "3",
                             "--max_side", "64", "--megapixels", "0.05", "0.2",
                             "--batch_size", "4", "--decode_threads", "2"])
    captured = capsys.readouterr()
    assert result["gpu"] is False and "not GPU figures" in result["note"]
    assert "NOTE: no CUDA GPU present" in captured.err
    assert result["images"] == 12 and result["max_side"] == 64 and result["batch_size"] == 4
    for part in ("decode", "model"):
        assert result[part]["img_per_s"] > 0
    assert result["end_to_end"]["bound"] in ("decode", "model")
    assert result["img_per_s"] > 0 and result["h2d"]["ms_per_batch"] >= 0
    import json

    assert json.loads(captured.out.strip().splitlines()[-1]) == result

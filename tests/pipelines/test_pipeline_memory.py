"""What `remap embed` makes the runner hold: nothing heavier than a shard row crosses a stage
boundary, so the job's memory does not grow with images' pixels (issue 15: the in-process
FnApiRunner kept every embedded image's pixels until the end of the run, 20 GB at 10k images)."""

from __future__ import annotations

from pathlib import Path

import pytest
from apache_beam.runners.portability.fn_api_runner import execution

import image_cases
from pipelines.embed import run
from pipelines.prepare import prepare
from remap_core.descriptor.checkpoint import load_model

SIDE = 256          # the model's input: pixels (256 x 192 x 3 = 147 kB) far above a shard row
N_IMAGES = 12


@pytest.fixture(scope="module")
def model_256(tmp_path_factory):
    """The tiny test network (EfficientNet-Lite0 GeM) at a 256 px input."""
    from remap_core.descriptor.checkpoint import save_checkpoint
    from remap_core.descriptor.model import build_model

    path = tmp_path_factory.mktemp("models") / "side256.pt"
    save_checkpoint(build_model({"max_side": SIDE}), str(path))
    return str(path)


@pytest.fixture()
def materialised(monkeypatch) -> list[int]:
    """Sizes of the encoded data the FnApiRunner takes into its buffers: every element that a
    stage hands to another stage (Flatten, GroupByKey, side input, any unfused consumer)."""
    sizes: list[int] = []
    for cls in (execution.ListBuffer, execution.GroupingBuffer,
                execution.WindowGroupingBuffer):
        def append(self, data, _original=cls.append):
            sizes.append(len(data))
            return _original(self, data)
        monkeypatch.setattr(cls, "append", append)
    return sizes


def test_no_image_pixels_cross_a_stage_boundary(tmp_path, model_256, materialised):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(N_IMAGES):
        w, h = (400, 300) if i % 2 else (300, 400)
        (images / f"photo_{i:03d}.jpg").write_bytes(image_cases.jpeg(w, h, seed=i))
    model = load_model(model_256, device="cpu")
    pixel_bytes = [prepare(str(p), p.read_bytes(), SIDE, model.config["multiple"]).pixels.nbytes
                   for p in sorted(Path(images).iterdir())]
    assert min(pixel_bytes) == 256 * 192 * 3     # the model's input, as the pipeline makes it

    summary = run([f"--input={images}", f"--output={tmp_path / 'store'}",
                   f"--model={model_256}", "--progress_seconds=0", "--batch_size=4"])

    assert summary["embedded"] == N_IMAGES and summary["accounted"]
    per_image = sum(materialised) / N_IMAGES
    # the hook sees the rows: each one's float32 embedding reaches the shard writer's GroupByKey
    assert per_image >= 4 * model.dim
    # an image's pixels crossing any boundary even once would cost at least its pixel array;
    # everything the runner held for all stages together stays below one such array per image
    assert per_image < min(pixel_bytes), (per_image, min(pixel_bytes))

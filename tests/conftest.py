"""Shared fixtures: bundled sample images and a tiny model checkpoint (fast on 2 CPU cores)."""

from __future__ import annotations

import os

# Traps measured on these machines (see README "Operating notes"): gcsfs hangs against emulators
# without this; keep torch from oversubscribing the 2 CI cores.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _index_cache_in_tmp(tmp_path_factory):
    """Remote indexes opened by tests are cached in a temporary folder, never in ~/.cache."""
    os.environ["REMAP_INDEX_CACHE"] = str(tmp_path_factory.mktemp("index-cache"))


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """The bundled sample collection: images/*.jpg and queries/<name>__<alteration>.jpg."""
    from remap_core.data.samples import write_samples

    out = tmp_path_factory.mktemp("samples")
    write_samples(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A real (ImageNet-weighted) EfficientNet-Lite0 GeM checkpoint at 64 px: fast to run."""
    from remap_core.descriptor.checkpoint import save_checkpoint
    from remap_core.descriptor.model import build_model

    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    save_checkpoint(build_model({"max_side": 64}), str(path))
    return str(path)


@pytest.fixture(scope="module")
def one_faiss_thread():
    """FAISS's OpenMP spin-waits badly on a shared 2-core CI box; one thread is faster there.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_faiss_thread")`."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)

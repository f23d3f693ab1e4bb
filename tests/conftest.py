import os

import pytest
import torch

# Keep the test suite deterministic and light on a 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored afterwards: many small ops (vmap, tiny renders) run several times
    faster on one thread than on two on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny random-weight Stable Diffusion pipeline saved (safetensors) into a temporary folder, once per session."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from carv.teachers.tiny_sd import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")

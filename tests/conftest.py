import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

GPU_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu")
HAS_GPU = torch.cuda.is_available()  # before any test can hide it


@pytest.fixture(autouse=True)
def _device_and_fresh_parallel_state(request, monkeypatch):
    """Everything outside tests/gpu runs on the CPU with gloo, also on a machine with a GPU (and so do
    the processes it starts: they inherit MEGAROPE_DEVICE). Each test starts and ends without a
    process group."""
    from megarope import compat, parallel

    on_gpu = os.path.abspath(str(request.node.path)).startswith(GPU_TESTS + os.sep)
    if not on_gpu:
        monkeypatch.setenv(compat.DEVICE_ENV, "cpu")
        compat.apply()
    yield
    parallel.destroy()
    if HAS_GPU and not on_gpu:
        compat.restore()  # the GPU tests of this session see the GPU again

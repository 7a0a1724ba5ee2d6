import collections
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


# `make test` runs the suite in two pytest-xdist workers, one per core of the 2-core machine CI uses: each worker and
# every process it starts computes on one thread, so that the workers do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The Slurm tests first, then modules with more slow tests. `make test` hands out whole modules (--dist
    loadfile: a module's fixtures, the Slurm cluster among them, are set up once), and the long ones must not be
    the last to start; the Slurm module, mostly waiting on its jobs, is the longest."""
    slurm = {item.path for item in items if item.get_closest_marker("slurm")}
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: (item.path not in slurm, -slow[item.path]))  # stable: a module keeps its order

import warnings

import pytest

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")


@pytest.fixture(autouse=True)
def _fresh_parallel_state():
    """Each test in this process starts and ends without a process group."""
    yield
    from megarope import parallel

    parallel.destroy()

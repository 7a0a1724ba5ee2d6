"""GPU tests (CUDA, and Transformer Engine where a test asks for it).

Skipped where no GPU is used, unless MEGAROPE_GPU_DRY=1 (benchmarks/gpu_validation.py --dry): then the
tests that need no Transformer Engine run on the CPU with the local backend at small sizes, so that
they cannot rot where no GPU ever runs them.

MEGAROPE_GPU_REPORT=path appends one JSON line per test to path as soon as it ends (outcome, seconds,
the numbers it recorded with pytest's ``record_property``, the failure's first line): a crash or a
time-out later in the file still leaves what ran.
"""

import json
import os

import pytest

from gpu_setup import CUDA, DRY

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if CUDA or DRY:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (MEGAROPE_GPU_DRY=1 runs those that need no TE on the CPU)")
    for item in items:
        if os.path.abspath(str(item.path)).startswith(HERE + os.sep):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> str:
    """Where "auto:toy" prepares the stdlib corpus: one place for all of the validation's test files."""
    work = os.environ.get("MEGAROPE_GPU_WORK")
    return os.path.join(work, "data") if work else str(tmp_path_factory.mktemp("data"))


def _first_line(report) -> str | None:
    if report.passed:
        return None
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text.strip().splitlines()[0][:500] if text.strip() else None


def pytest_runtest_logreport(report):
    path = os.environ.get("MEGAROPE_GPU_REPORT")
    if not path or not (report.when == "call" or report.failed or (report.when == "setup" and report.skipped)):
        return
    line = {"test": report.nodeid, "outcome": report.outcome, "phase": report.when,
            "seconds": round(report.duration, 2), "properties": dict(report.user_properties),
            "message": _first_line(report)}
    with open(path, "a") as f:
        f.write(json.dumps(line, default=str) + "\n")

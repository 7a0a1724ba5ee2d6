"""MEGAROPE_DEVICE=cpu: on a machine with a GPU, megarope and megatron-core see none until compat.restore()."""

import torch

from megarope import compat, parallel


def test_megarope_device_cpu_hides_a_gpu_until_restored(monkeypatch):
    compat.restore()  # the test suite applied the CPU patches already: start from none
    unpatched = torch.cuda.current_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU
    monkeypatch.setenv(compat.DEVICE_ENV, "cpu")
    assert not compat.uses_cuda()
    compat.apply()
    assert not torch.cuda.is_available()  # what every caller (model building, the optimizer, megatron) asks
    assert parallel.device() == torch.device("cpu") and torch.cuda.current_device() == torch.device("cpu")
    compat.restore()
    assert torch.cuda.is_available() and torch.cuda.current_device is unpatched
    monkeypatch.delenv(compat.DEVICE_ENV)
    assert compat.uses_cuda()
    compat.apply()  # a GPU in use: nothing to patch
    assert torch.cuda.is_available() and torch.cuda.current_device is unpatched
    compat.restore()

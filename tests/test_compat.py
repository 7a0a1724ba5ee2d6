"""The CPU fixes for megatron-core: applied without CUDA (or with MEGAROPE_DEVICE=cpu), narrow, undone
by compat.restore(). The test suite runs with MEGAROPE_DEVICE=cpu, so they are applied here."""

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


def test_the_pipeline_schedules_make_their_cuda_tensor_on_the_cpu():
    from megatron.core.pipeline_parallel import schedules

    compat.apply()
    made = schedules.torch.zeros([], dtype=torch.int, device="cuda")  # the schedules' one CUDA literal
    assert made.device == torch.device("cpu") and made.dtype == torch.int
    assert schedules.torch.Tensor is torch.Tensor and schedules.torch.int is torch.int  # the rest is torch
    assert schedules.torch.zeros(2, device="meta").device == torch.device("meta")
    assert torch.zeros is not schedules.torch.zeros  # torch itself is untouched


def test_recompute_saves_and_restores_an_empty_cuda_rng_state():
    from megatron.core.tensor_parallel import random as megatron_random

    compat.apply()
    cpu = torch.get_rng_state()
    cpu_state, cuda_state, _ = megatron_random._get_all_rng_states()
    assert cuda_state.numel() == 0 and torch.equal(cpu_state, cpu)
    torch.rand(3)
    megatron_random._set_all_rng_states(cpu_state, cuda_state, {})
    assert torch.equal(torch.get_rng_state(), cpu)  # the CPU generator, which CPU dropout uses, is restored

"""The context-parallel attention's CUDA kernels (memory-efficient SDPA with its log-sum-exp).

The CP schedule around them is the same code on every device and is tested on the CPU (tests/test_attention.py);
what only a GPU can check is the kernel layer: the padded LSE, the GQA fold, the backward call, and the row
layout the backward kernel assumes for ``out`` without checking it (attention.kernel_args packs it; the CPU tests
check the layout it returns). Run on a GPU machine: `python -m pytest -q tests/gpu/test_attention_cuda.py`.
With MEGAROPE_GPU_DRY=1 they run on the CPU's kernels: the tests' own logic, not the CUDA kernel.

bf16 tolerances are derived, not guessed: torch's own SDPA, in the same dtype and through the kernel megarope
calls on that device (CUDA: the memory-efficient backend, K/V heads repeated; CPU: the flash kernel, which takes
GQA itself), on the same inputs, is as far from a float64 reference as that kernel gets in bf16. megarope's one
kernel call may be KERNEL_MARGIN times as far (it is the same kernel on the same rows; on CPUs the ratio is 1);
the CP core CP_MARGIN times (a key's gradient adds up to three parts' bf16 kernel outputs: at most 2.0x on CPUs
over 32 draws). Each test records both errors. The H200's dq with `out` in the wrong layout was off by up to
1.70; an emulation of the kernel's reads puts the in-bounds errors at 0.3 to 6, where torch's own are about 0.01.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_setup import CUDA
from megarope import attention as A
from megarope import parallel

DEVICE = "cuda" if CUDA else "cpu"
KERNEL_MARGIN = 2
CP_MARGIN = 3
S, HEADS, D = 200, 8, 64  # 200: not a multiple of the kernel's 32-query LSE blocks


def _inputs(shape_q, shape_kv, dtype, seed: int = 0):
    """q, k, v of these shapes on the device, and the generator for what else a test draws."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(shape_q, device=DEVICE, dtype=dtype, generator=g)
    k, v = (torch.randn(shape_kv, device=DEVICE, dtype=dtype, generator=g) for _ in range(2))
    return q, k, v, g


def _sdpa(q, k, v, grad, causal: bool, scale: float):
    """(out, [dq, dk, dv]) of torch's own SDPA on q's device and dtype, q [b, h, s, d] over k, v [b, hk, s, d].
    Below float64 on CUDA it takes the memory-efficient kernel, with the K/V heads repeated (the kernel megarope
    calls, without its fold); float64 takes torch's math backend: the reference."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    query, key, value = leaves
    backend = contextlib.nullcontext()
    if q.is_cuda and q.dtype != torch.float64:
        key, value = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (key, value))
        backend = sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)
    with backend:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scale,
                                             enable_gqa=key.shape[1] != query.shape[1])
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def _error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return (x.double() - reference).abs().max().item()


def _as_close_as_torch(mine, torch_own, reference, margin: float, record_property) -> None:
    """Each of ``mine`` (out, dq, dk, dv) at most ``margin`` times as far from the float64 reference as torch's own."""
    for name, got, theirs, exact in zip(("out", "dq", "dk", "dv"), mine, torch_own, reference):
        error, torch_error = _error(got, exact), _error(theirs, exact)
        record_property(f"{name}_error", error)
        record_property(f"{name}_torch_error", torch_error)
        assert error <= margin * torch_error, \
            f"{name}: {error:.3g} from float64, {error / torch_error:.2f} x torch's own {got.dtype} kernel's error"


@contextlib.contextmanager
def _deterministic():
    """The backward kernel splits keys across blocks and adds their dq in any order unless asked not to."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_kernel_forward_backward_and_lse(dtype, causal, kv_heads, record_property):
    q, k, v, g = _inputs((2, HEADS, S, D), (2, kv_heads, S, D), dtype)
    scale = D ** -0.5
    out, lse = A.attention_with_lse(q, k, v, causal, scale)
    grad = torch.randn(out.shape, device=DEVICE, dtype=dtype, generator=g)
    exact_out, exact_grads = _sdpa(*(t.double() for t in (q, k, v)), grad.double(), causal, scale)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(HEADS // kv_heads, 1)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    assert lse.shape == (2, HEADS, S)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=tol, atol=tol)

    dq, dk, dv = A.attention_with_lse_backward(grad, q, k, v, out, lse, causal, scale)
    assert dk.shape == k.shape and dv.shape == v.shape
    if dtype == torch.float32:  # what the H200 met, with room
        for got, exact in zip((out, dq, dk, dv), (exact_out, *exact_grads)):
            torch.testing.assert_close(got.double(), exact, rtol=2e-4, atol=2e-4)
    else:
        torch_out, torch_grads = _sdpa(q, k, v, grad, causal, scale)
        _as_close_as_torch((out, dq, dk, dv), (torch_out, *torch_grads), (exact_out, *exact_grads), KERNEL_MARGIN,
                           record_property)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_gradients_do_not_depend_on_the_memory_layout_of_out(dtype, causal, kv_heads):
    """The same values of out and grad_out in three layouts -- [b, h, s, d] contiguous, a view of megarope's
    [s, b, h, d] buffers with b = 2 (what _Parts.backward passes), the kernel's own rows -- give equal gradients."""
    q, k, v, g = _inputs((2, HEADS, S, D), (2, kv_heads, S, D), dtype)
    scale = D ** -0.5
    out, lse = A.attention_with_lse(q, k, v, causal, scale)
    grad = torch.randn(out.shape, device=DEVICE, dtype=dtype, generator=g)
    layouts = {"kernel rows": lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),
               "[b, h, s, d]": lambda x: x.contiguous(),
               "[s, b, h, d] buffer": lambda x: x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)}
    with _deterministic():
        grads = {name: A.attention_with_lse_backward(lay(grad), q, k, v, lay(out), lse, causal, scale)
                 for name, lay in layouts.items()}
    for name, got in grads.items():
        for which, a, b in zip(("dq", "dk", "dv"), got, grads["kernel rows"]):
            assert torch.equal(a, b), f"{which} with out and grad_out as {name} is not {which} with the kernel's rows"


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_cp_core_gradients_with_micro_batch_2(kv_heads, record_property):
    """The views _Parts.backward hands the kernels: [b, h, s, d] views of [s, 2, h, d] buffers. A CP group of one
    runs every kind of part: its two chunks causally (K/V repeated under GQA) and the second chunk's queries over
    the first chunk's keys unmasked (folded under GQA)."""
    parallel.init()
    q, k, v, g = _inputs((S, 2, HEADS, D), (S, 2, kv_heads, D), torch.bfloat16)
    scale = D ** -0.5
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = A.context_parallel_attention(*leaves, parallel.cp_group(), scale)
    grad = torch.randn(out.shape, device=DEVICE, dtype=out.dtype, generator=g)
    out.backward(grad)

    def bhsd(x):
        return x.permute(1, 2, 0, 3)

    exact_out, exact_grads = _sdpa(*(bhsd(t.double()) for t in (q, k, v)), bhsd(grad.double()), True, scale)
    torch_out, torch_grads = _sdpa(*(bhsd(t) for t in (q, k, v)), bhsd(grad), True, scale)
    _as_close_as_torch([bhsd(t) for t in (out.detach(), *(x.grad for x in leaves))], (torch_out, *torch_grads),
                       (exact_out, *exact_grads), CP_MARGIN, record_property)


def test_parts_merge_to_the_whole_on_cuda():
    g = torch.Generator(device=DEVICE).manual_seed(1)
    q = torch.randn(1, 8, 96, 64, device=DEVICE, generator=g)
    k, v = (torch.randn(1, 2, 96, 64, device=DEVICE, generator=g) for _ in range(2))
    rows = slice(64, 96)
    out, lse = A.attention_with_lse(q[:, :, rows], k[:, :, :64], v[:, :, :64], False, 0.125)
    diag, diag_lse = A.attention_with_lse(q[:, :, rows], k[:, :, rows], v[:, :, rows], True, 0.125)
    A.merge_parts(out, lse, diag, diag_lse)
    whole = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    torch.testing.assert_close(out, whole[:, :, rows], rtol=2e-5, atol=2e-5)

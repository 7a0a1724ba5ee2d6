"""The context-parallel attention's CUDA kernels (memory-efficient SDPA with its log-sum-exp). Skipped without CUDA.

The CP schedule around them is the same code on every device and is tested on the CPU (tests/test_attention.py);
what only a GPU can check is the kernel layer: the padded LSE, the GQA folding, the backward call.
Run on a GPU machine: `python -m pytest -q tests/gpu/test_attention_cuda.py`.
"""

import pytest
import torch
import torch.nn.functional as F

from megarope import attention as A

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_kernel_forward_backward_and_lse(dtype, tol, causal, kv_heads):
    g = torch.Generator(device="cuda").manual_seed(0)
    s, heads, d = 200, 8, 64  # 200: not a multiple of the kernel's 32-query LSE blocks
    q = torch.randn(2, heads, s, d, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(2, kv_heads, s, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    scale = d ** -0.5
    out, lse = A.attention_with_lse(q, k, v, causal, scale)
    leaves = [t.float().detach().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*leaves, is_causal=causal, scale=scale, enable_gqa=True)
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    scores = torch.einsum("bhqd,bhkd->bhqk", leaves[0], leaves[1].repeat_interleave(heads // kv_heads, 1)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    assert lse.shape == (2, heads, s)
    torch.testing.assert_close(lse.float(), scores.logsumexp(-1), rtol=tol, atol=tol)

    grad = torch.randn(out.shape, device="cuda", dtype=dtype, generator=g)
    expected.backward(grad.float())
    dq, dk, dv = A.attention_with_lse_backward(grad, q, k, v, out, lse, causal, scale)
    assert dk.shape == k.shape
    for got, leaf in zip((dq, dk, dv), leaves):
        torch.testing.assert_close(got.float(), leaf.grad, rtol=10 * tol, atol=10 * tol)


def test_parts_merge_to_the_whole_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, 8, 96, 64, device="cuda", generator=g)
    k, v = (torch.randn(1, 2, 96, 64, device="cuda", generator=g) for _ in range(2))
    rows = slice(64, 96)
    out, lse = A.attention_with_lse(q[:, :, rows], k[:, :, :64], v[:, :, :64], False, 0.125)
    diag, diag_lse = A.attention_with_lse(q[:, :, rows], k[:, :, rows], v[:, :, rows], True, 0.125)
    A.merge_parts(out, lse, diag, diag_lse)
    whole = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    torch.testing.assert_close(out, whole[:, :, rows], rtol=2e-5, atol=2e-5)

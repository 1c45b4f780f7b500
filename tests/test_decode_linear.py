"""decode_linear against F.linear: values, rows computed alike whatever the batch, gradients,
opcheck, torch.compile and errors."""

import pytest
import torch
import torch.nn.functional as F

from eefast.ops import decode_linear

# (leading shape of x, in, out): one row, a verify step, the row limit (8), past it (sgemm),
# odd widths (the kernel's 16/8/scalar tails) and empty.
SHAPES = [
    ((1,), 64, 96),
    ((5,), 37, 130),
    ((2, 4), 576, 200),
    ((32,), 24, 65),
    ((3, 3), 40, 70),
    ((40,), 48, 33),
    ((0,), 16, 8),
]


def make(lead, k, n, dtype, device, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    return x, w, b


@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_linear(device, lead, k, n, dtype, bias):
    x, w, b = make(lead, k, n, dtype, device, bias)
    got = decode_linear(x, w, b)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == dtype and got.shape == (*lead, n)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gives_the_same_bits_alone_or_in_a_batch(dtype):
    """On CPU a token's logits must not depend on how many tokens are verified with it (cuBLAS
    makes no such promise, so CUDA is not held to it)."""
    x, w, b = make((8,), 131, 300, dtype, "cpu", bias=True)
    batch = decode_linear(x, w, b)
    for i in range(8):
        assert torch.equal(decode_linear(x[i : i + 1], w, b), batch[i : i + 1])
    assert torch.equal(decode_linear(x[2:7], w, b), batch[2:7])


@pytest.mark.parametrize("bias", [False, True])
def test_gradients_match_linear(device, bias):
    x, w, b = make((3, 2), 20, 12, torch.float64, "cpu", bias)
    x, w = x.float().to(device), w.float().to(device)
    b = None if b is None else b.float().to(device)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    grad = torch.randn(3, 2, 12, device=device)
    got = torch.autograd.grad(decode_linear(x, w, b), leaves, grad)
    want = torch.autograd.grad(F.linear(x, w, b), leaves, grad)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("rows", [1, 6, 40])
def test_opcheck(device, rows):
    x, w, b = make((rows,), 24, 40, torch.float32, device, bias=True)
    torch.library.opcheck(torch.ops.eefast.decode_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.eefast.decode_linear.default, (x.requires_grad_(), w, None))


def test_torch_compile_fullgraph(device):
    x, w, b = make((4,), 32, 48, torch.float32, device, bias=True)

    @torch.compile(fullgraph=True)
    def f(x, w, b):
        return decode_linear(x, w, b).relu()

    torch.testing.assert_close(f(x, w, b), F.linear(x, w, b).relu(), atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused(device):
    x, w, _ = make((2,), 8, 4, torch.float32, device, bias=False)
    with pytest.raises(RuntimeError, match="must equal weight's in features"):
        decode_linear(x[:, :5], w)
    with pytest.raises(RuntimeError, match="weight has dtype Float but x has BFloat16"):
        decode_linear(x.bfloat16(), w)
    with pytest.raises(RuntimeError, match=r"bias must be \[4\]"):
        decode_linear(x, w, torch.zeros(3, device=device))

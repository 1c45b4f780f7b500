"""decode_linear against F.linear: values, rows computed alike whatever the batch, gradients,
opcheck, torch.compile and errors."""

import pytest
import torch
import torch.nn.functional as F

from eefast.ops import decode_linear

# (leading shape of x, in, out): one row, a verify step, a small batch's verify, the row limit
# (64), past it (sgemm), odd widths (the kernel's 16/8/scalar tails) and empty.
SHAPES = [
    ((1,), 64, 96),
    ((5,), 37, 130),
    ((2, 4), 576, 200),
    ((32,), 24, 65),
    ((3, 3), 40, 70),
    ((8, 8), 48, 33),
    ((70,), 48, 33),
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
@pytest.mark.parametrize("k", [131, 136, 576])  # scalar tail, last 8-wide step, none
def test_a_row_gives_the_same_bits_alone_or_in_a_batch(dtype, k):
    """On CPU a token's logits must not depend on how many tokens are verified with it, up to
    64 rows (1-4 rows take the AVX2 kernel, more the AVX-512 tiles where the CPU has them;
    cuBLAS makes no such promise, so CUDA is not held to it)."""
    x, w, b = make((64,), k, 300, dtype, "cpu", bias=True)
    alone = torch.cat([decode_linear(x[i : i + 1], w, b) for i in range(64)])
    for rows in (2, 4, 5, 7, 8, 13, 32, 64):
        assert torch.equal(decode_linear(x[:rows], w, b), alone[:rows]), rows
    assert torch.equal(decode_linear(x[2:7], w, b), alone[2:7])


def test_the_avx2_and_avx512_kernels_give_the_same_bits(tmp_path):
    """A machine without AVX-512 (EEFAST_DISABLE_AVX512=1 here) computes every row exactly as
    one with it does, so outputs do not depend on the CPU."""
    import os
    import subprocess
    import sys

    x, w, b = make((13,), 136, 70, torch.float32, "cpu", bias=True)
    want = decode_linear(x, w, b)
    code = (
        "import sys, torch\n"
        "from eefast.ops import decode_linear\n"
        "x, w, b, want = torch.load(sys.argv[1])\n"
        "assert torch.equal(decode_linear(x, w, b), want)\n"
    )
    path = tmp_path / "case.pt"
    torch.save((x, w, b, want), path)
    env = {**os.environ, "EEFAST_DISABLE_AVX512": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


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

"""exit_stats against full-logits torch: values, ties, NaN, determinism, opcheck, errors."""

import os
import subprocess
import sys

import pytest
import torch

import eefast
from eefast.ops.reference import exit_stats as exit_stats_reference

# (leading shape of hidden, d, vocab): few rows (threads over vocab) and many rows (over rows),
# vocab below, at and above one chunk (2048) with a remainder.
SHAPES = [
    ((1,), 64, 1000),
    ((3, 5), 37, 4099),  # 15 rows: the few-rows path
    ((40,), 24, 2048),  # many rows, exactly one chunk
    ((2, 33), 16, 5000),  # 66 rows: many rows, 3 chunks
    ((0,), 8, 300),  # empty
    ((4,), 8, 1),  # vocab of one: p = 1, entropy 0, margin 1
]


def make(lead, d, vocab, w_dtype, device, bias=False, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, d, generator=g).to(device)
    weight = (torch.randn(vocab, d, generator=g) * scale / d**0.5).to(w_dtype).to(device)
    b = torch.randn(vocab, generator=g).to(w_dtype).to(device) if bias else None
    return hidden, weight, b


def check_against_reference(got, want, atol):
    for name in ("lse", "max_prob", "entropy", "margin"):
        torch.testing.assert_close(
            getattr(got, name).cpu(), getattr(want, name).cpu(), atol=atol, rtol=atol, msg=name
        )
    assert got.argmax.dtype == torch.int64
    # The argmax may differ only where the top two logits are within rounding of each other.
    differ = got.argmax.cpu() != want.argmax.cpu()
    assert (want.margin.cpu()[differ] < 1e-4).all(), "argmax differs on a clear winner"


@pytest.mark.parametrize("lead,d,vocab", SHAPES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(device, lead, d, vocab, w_dtype, bias):
    hidden, weight, b = make(lead, d, vocab, w_dtype, device, bias, scale=4.0)
    got = eefast.exit_stats(hidden, weight, b)
    want = exit_stats_reference(hidden, weight, b)
    assert got.lse.shape == hidden.shape[:-1] and got.lse.dtype == torch.float32
    check_against_reference(got, want, atol=2e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature(device, temperature):
    hidden, weight, b = make((6,), 32, 3000, torch.float32, device, bias=True, scale=3.0)
    got = eefast.exit_stats(hidden, weight, b, temperature)
    check_against_reference(got, exit_stats_reference(hidden, weight, b, temperature), atol=2e-5)


def test_bf16_hidden(device):
    hidden, weight, _ = make((20,), 32, 2500, torch.bfloat16, device, scale=3.0)
    hidden = hidden.to(torch.bfloat16)
    check_against_reference(
        eefast.exit_stats(hidden, weight), exit_stats_reference(hidden, weight), atol=2e-5
    )


def test_non_contiguous_hidden(device):
    hidden, weight, _ = make((8, 6), 24, 2100, torch.float32, device, scale=3.0)
    hidden_t = hidden.transpose(0, 1)
    assert not hidden_t.is_contiguous()
    check_against_reference(
        eefast.exit_stats(hidden_t, weight), exit_stats_reference(hidden_t, weight), atol=2e-5
    )


def test_ties_take_the_first_index(device):
    # Identical weight rows in different chunks give identical logits: argmax is the first.
    hidden = torch.ones(3, 4, device=device)
    weight = torch.zeros(5000, 4, device=device)
    weight[[100, 2100, 4500]] = 1.0
    got = eefast.exit_stats(hidden, weight)
    assert got.argmax.tolist() == [100, 100, 100]
    assert torch.allclose(got.margin, torch.zeros(3, device=device), atol=1e-7)


def test_nan_logit_propagates(device):
    hidden, weight, _ = make((3,), 8, 3000, torch.float32, device)
    weight[2500, 0] = float("nan")
    got = eefast.exit_stats(hidden, weight)
    want = exit_stats_reference(hidden, weight)
    assert torch.isnan(got.lse).all() and torch.isnan(got.entropy).all()
    assert got.argmax.tolist() == want.argmax.tolist() == [2500, 2500, 2500]


@pytest.mark.parametrize("rows", [4, 300])
def test_same_bits_for_any_thread_count(rows):
    hidden, weight, b = make((rows,), 48, 7000, torch.float32, "cpu", bias=True, scale=3.0)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(eefast.exit_stats(hidden, weight, b))
    finally:
        torch.set_num_threads(before)
    for a, c in zip(*results, strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("rows", [3, 40])
def test_opcheck(device, rows):
    hidden, weight, b = make((rows,), 16, 2300, torch.float32, device, bias=True)
    torch.library.opcheck(torch.ops.eefast.exit_stats.default, (hidden, weight, b, 1.5))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    hidden, weight, _ = make((5,), 16, 3000, torch.float32, device, scale=3.0)

    @torch.compile(fullgraph=True)
    def confident(h):
        stats = eefast.exit_stats(h, weight)
        return stats.max_prob > 0.01, stats.argmax

    mask, arg = confident(hidden)
    want = exit_stats_reference(hidden, weight)
    assert torch.equal(mask, want.max_prob > 0.01) and torch.equal(arg, want.argmax)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weight": torch.randn(100, 9)}, "hidden has d=8"),
        ({"bias": torch.randn(99)}, r"bias must be \[vocab=100\]"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"temperature": -1.0}, "temperature must be"),
        ({"weight": torch.randn(100, 8, dtype=torch.float64)}, "weight must be float32 or bf"),
        ({"hidden": torch.ones(2, 8, dtype=torch.int32)}, "hidden must be float32"),
        ({"hidden": torch.tensor(1.0)}, "0-d"),
        ({"bias": torch.randn(100, dtype=torch.bfloat16)}, "bias has dtype"),
        ({"weight": torch.randn(0, 8)}, "empty vocab"),
        ({"weight": torch.randn(100, 8, device="meta")}, "weight is on meta"),
    ],
)
def test_bad_input(kwargs, message):
    args = {
        "hidden": torch.randn(2, 8),
        "weight": torch.randn(100, 8),
        "bias": None,
        "temperature": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.eefast.exit_stats.default(
            args["hidden"], args["weight"], args["bias"], args["temperature"]
        )


def test_portable_kernels_match_reference():
    """The non-AVX2 path (what CPUs without AVX2 run), forced in a fresh process."""
    code = """
import torch, eefast
from eefast.ops.reference import exit_stats as exit_stats_reference
torch.manual_seed(0)
for rows, vocab in ((3, 4100), (40, 2500)):
    for w_dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(rows, 40)
        w = (torch.randn(vocab, 40) / 2).to(w_dtype)
        b = torch.randn(vocab).to(w_dtype)
        got, want = eefast.exit_stats(h, w, b, 0.7), exit_stats_reference(h, w, b, 0.7)
        for name in ("lse", "max_prob", "entropy", "margin"):
            g, w_ = getattr(got, name), getattr(want, name)
            torch.testing.assert_close(g, w_, atol=2e-5, rtol=2e-5)
        assert torch.equal(got.argmax, want.argmax)
print("ok")
"""
    env = {**os.environ, "EEFAST_DISABLE_AVX2": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]

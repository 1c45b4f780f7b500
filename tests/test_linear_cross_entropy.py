"""linear_cross_entropy against full-logits torch: losses, gradients, multi-exit, errors."""

import os
import subprocess
import sys

import pytest
import torch

import eefast
from eefast.ops.reference import linear_cross_entropy as linear_cross_entropy_reference

# (tokens, d, vocab): one chunk; one chunk of a wider vocabulary; several chunks of rows (a
# trainable head's vocab-major chunks are 64 rows here, the row path's 272).
SHAPES = [(13, 24, 1001), (150, 16, 30001), (600, 8, 30001)]


def make(n, d, vocab, device, w_dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(device).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g) / 4).to(w_dtype).to(device).requires_grad_()
    b = torch.randn(vocab, generator=g).to(device).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    targets[::5] = -100
    return hidden, weight, b, targets


def run(fn, hidden, weight, bias, targets, grad_seed=1, **kw):
    loss = fn(hidden, weight, targets, bias, **kw)
    grad = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed)).to(loss)
    loss.backward(grad)
    out = [loss.detach(), hidden.grad, weight.grad] + ([bias.grad] if bias is not None else [])
    hidden.grad = weight.grad = None
    if bias is not None:
        bias.grad = None
    return out


def assert_matches(got, want, tol):
    for g, w in zip(got, want, strict=True):
        scale = max(w.abs().max().item(), 1e-6) if w.numel() else 1.0
        err = (g.float() - w.float()).abs().max().item() if w.numel() else 0.0
        assert err <= tol * scale, f"max err {err:.3e} at scale {scale:.3e}"


@pytest.mark.parametrize("n,d,vocab", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("extra", ["plain", "z_loss", "kd", "bias"])
def test_matches_reference(device, n, d, vocab, reduction, extra):
    hidden, weight, bias, targets = make(n, d, vocab, device, bias=extra == "bias")
    kw = {"reduction": reduction}
    if extra == "z_loss":
        kw["z_loss"] = 1e-3
    if extra == "kd":
        g = torch.Generator().manual_seed(7)
        kw["teacher"] = (
            torch.randn(n, 12, generator=g).to(device),
            (torch.randn(vocab, 12, generator=g) / 3).to(device),
        )
        kw["kd_weight"] = 0.5
    got = run(eefast.linear_cross_entropy, hidden, weight, bias, targets, **kw)
    want = run(linear_cross_entropy_reference, hidden, weight, bias, targets, **kw)
    assert_matches(got, want, 3e-5 if n >= 600 else 1e-5)  # fp32 sums over 600 rows round more


@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_weight(device, h_dtype, bias):
    """A bf16 head (CPU: upcast blocks; CUDA with a bf16 hidden: bf16 GEMMs, fp32 logits)."""
    hidden, weight, b, targets = make(40, 16, 9000, device, w_dtype=torch.bfloat16, bias=bias)
    hidden = hidden.detach().to(h_dtype).requires_grad_()
    got = run(eefast.linear_cross_entropy, hidden, weight, b, targets)
    want = run(linear_cross_entropy_reference, hidden, weight, b, targets)
    assert got[1].dtype == h_dtype and got[2].dtype == torch.bfloat16
    assert_matches(got, want, 1e-2)


def test_all_ignored_and_empty(device):
    hidden, weight, _, targets = make(6, 8, 300, device)
    targets.fill_(-100)
    loss = eefast.linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0
    empty = torch.zeros(0, 8, device=device, requires_grad=True)
    loss = eefast.linear_cross_entropy(empty, weight, targets[:0], reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 8)


def test_frozen_weight_gets_no_grad(device):
    hidden, weight, _, targets = make(9, 8, 500, device)
    weight.requires_grad_(False)
    eefast.linear_cross_entropy(hidden, weight, targets).backward()
    assert hidden.grad is not None and weight.grad is None


def test_multi_exit_shared_weight(device):
    hidden, weight, _, targets = make(20, 16, 2000, device)
    hiddens = [hidden, (hidden.detach() * 0.5).requires_grad_(), hidden.detach().requires_grad_()]
    total, losses = eefast.multi_exit_cross_entropy(hiddens, weight, targets, [1.0, 0.5, 2.0])
    total.backward()
    want_grad, want_total = torch.zeros_like(weight), 0.0
    for h, c in zip(hiddens, [1.0, 0.5, 2.0], strict=True):
        w = weight.detach().clone().requires_grad_()
        loss = linear_cross_entropy_reference(h.detach(), w, targets)
        (c * loss).backward()
        want_grad += w.grad
        want_total += c * loss.item()
    assert len(losses) == 3
    torch.testing.assert_close(total.item(), want_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, want_grad, rtol=1e-4, atol=1e-6)


# (tokens, d, vocab): one vocab block; three blocks; two groups of rows with 256-column blocks.
FROZEN_SHAPES = [(13, 24, 1001), (150, 16, 30001), (8200, 8, 1000)]


@pytest.mark.parametrize("n,d,vocab", FROZEN_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("extra", ["plain", "z_loss", "bias", "bf16_weight"])
def test_frozen_head_matches_reference(device, n, d, vocab, reduction, extra):
    """A head without gradient takes the vocab-block path on the CPU (online softmax)."""
    w_dtype = torch.bfloat16 if extra == "bf16_weight" else torch.float32
    hidden, weight, bias, targets = make(n, d, vocab, device, w_dtype=w_dtype, bias=extra == "bias")
    weight.requires_grad_(False)
    if bias is not None:
        bias.requires_grad_(False)
    kw = {"reduction": reduction, "z_loss": 1e-3 if extra == "z_loss" else 0.0}
    got = run(eefast.linear_cross_entropy, hidden, weight, bias, targets, **kw)
    want = run(linear_cross_entropy_reference, hidden, weight, bias, targets, **kw)
    assert got[2] is None and want[2] is None
    assert_matches(got[:2], want[:2], 1e-2 if w_dtype == torch.bfloat16 else 1e-5)
    with torch.no_grad():
        loss, lse = eefast.linear_cross_entropy(
            hidden, weight, targets, bias, **kw, return_lse=True
        )
        logits = hidden.float() @ weight.float().t() + (0 if bias is None else bias)
        want_lse = torch.where(targets != -100, logits.logsumexp(1), 0.0)
    torch.testing.assert_close(loss, got[0])
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-4)


def test_frozen_head_nan_row_stays_in_its_row():
    hidden, weight, _, targets = make(40, 8, 3000, "cpu")
    weight.requires_grad_(False)
    targets[3] = 5
    with torch.no_grad():
        hidden[3, 2] = float("nan")
    loss = eefast.linear_cross_entropy(hidden, weight, targets, reduction="none")
    loss.sum().backward()
    assert loss[3].isnan() and hidden.grad[3].isnan().all()
    others = torch.arange(40) != 3
    assert loss[others].isfinite().all() and hidden.grad[others].isfinite().all()


@pytest.mark.parametrize("reduction", [0, 1])
def test_opcheck(device, reduction):
    hidden, weight, bias, targets = make(10, 8, 700, device, bias=True)
    args = (hidden, weight, targets, bias, None, None, -100, reduction, 1e-4, 0.0, 0.0, 0.0, None,
            True)  # fmt: skip
    torch.library.opcheck(torch.ops.eefast.linear_cross_entropy.default, args)
    class_weight = torch.rand(700, device=device) + 0.5
    args = (hidden, weight, targets, bias, None, None, -100, reduction, 1e-4, 0.0, 0.1, 30.0,
            class_weight, True)  # fmt: skip
    torch.library.opcheck(torch.ops.eefast.linear_cross_entropy.default, args)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    hidden, weight, _, targets = make(12, 8, 900, device)

    @torch.compile(fullgraph=True)
    def step(h, w):
        return eefast.linear_cross_entropy(h, w, targets, z_loss=1e-4)

    loss = step(hidden, weight)
    loss.backward()
    got = [loss.detach(), hidden.grad, weight.grad]
    hidden.grad = weight.grad = None
    want = eefast.linear_cross_entropy(hidden, weight, targets, z_loss=1e-4)
    want.backward()
    assert_matches(got, [want.detach(), hidden.grad, weight.grad], 1e-6)


@pytest.mark.parametrize(
    "over,message",
    [
        ({"weight": torch.randn(100, 9)}, "hidden has d=8"),
        ({"targets": torch.tensor([0, 1, 100, 2])}, "targets must be in"),
        ({"targets": torch.tensor([0, 1, -3, 2])}, "targets must be in"),
        ({"targets": torch.tensor([0, 1, 2, 3], dtype=torch.int32)}, "targets must be int64"),
        ({"targets": torch.tensor([0, 1])}, "targets must be"),
        ({"weight": torch.randn(100, 8, dtype=torch.float64)}, "weight must be float32 or bf"),
        ({"bias": torch.randn(99)}, r"bias must be \[vocab=100\]"),
        (
            {"teacher_weight": torch.randn(99, 4), "teacher_hidden": torch.randn(4, 4)},
            "teacher_weight must have the student's vocab",
        ),
        ({"z_loss": -1.0}, "z_loss and kd_weight must be finite and >= 0"),
        ({"kd_weight": 0.5}, "kd_weight > 0 needs a teacher"),
    ],
)
def test_bad_input(over, message):
    args = {
        "hidden": torch.randn(4, 8),
        "weight": torch.randn(100, 8),
        "targets": torch.tensor([0, 1, 2, -100]),
        "bias": None,
        "teacher_hidden": None,
        "teacher_weight": None,
        "z_loss": 0.0,
        "kd_weight": 0.0,
    }
    args.update(over)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.eefast.linear_cross_entropy.default(
            args["hidden"],
            args["weight"],
            args["targets"],
            args["bias"],
            args["teacher_hidden"],
            args["teacher_weight"],
            -100,
            1,
            args["z_loss"],
            args["kd_weight"],
            0.0,
            0.0,
            None,
            False,
        )


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction must be one of"):
        eefast.linear_cross_entropy(
            torch.randn(2, 4), torch.randn(10, 4), torch.tensor([0, 1]), reduction="avg"
        )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_multi_exit_fused_with_bias_and_teacher(device, reduction):
    hidden, weight, bias, targets = make(30, 16, 3000, device, bias=True)
    hiddens = [hidden, (hidden.detach() * 2).requires_grad_()]
    g = torch.Generator().manual_seed(3)
    teacher = (
        torch.randn(30, 8, generator=g).to(device),
        (torch.randn(3000, 8, generator=g) / 3).to(device),
    )
    kw = {
        "bias": bias,
        "reduction": reduction,
        "z_loss": 1e-3,
        "teacher": teacher,
        "kd_weight": 0.3,
    }
    total, losses = eefast.multi_exit_cross_entropy(hiddens, weight, targets, [0.7, 1.3], **kw)
    total.backward()
    got = [total.detach(), losses, *(h.grad for h in hiddens), weight.grad, bias.grad]
    for t in (*hiddens, weight, bias):
        t.grad = None
    ref = [linear_cross_entropy_reference(h, weight, targets, **kw) for h in hiddens]
    want_total = 0.7 * ref[0] + 1.3 * ref[1]
    want_total.backward()
    want = [
        want_total.detach(),
        torch.stack([r.detach() for r in ref]),
        *(h.grad for h in hiddens),
        weight.grad,
        bias.grad,
    ]
    assert_matches(got, want, 1e-5)


def test_multi_exit_own_weights_match_per_exit_calls(device):
    hidden, weight, _, targets = make(10, 8, 800, device)
    weight2 = (weight.detach() * 0.5).requires_grad_()
    total, losses = eefast.multi_exit_cross_entropy(
        [hidden, hidden], [weight, weight2], targets, [1.0, 2.0]
    )
    want = [linear_cross_entropy_reference(hidden, w, targets) for w in (weight, weight2)]
    torch.testing.assert_close(losses, torch.stack(want).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, want[0] + 2 * want[1], rtol=1e-5, atol=1e-6)


def test_multi_exit_opcheck(device):
    hidden, weight, bias, targets = make(10, 8, 700, device, bias=True)
    args = (
        [hidden, (hidden.detach() + 1).requires_grad_()],
        weight,
        targets,
        bias,
        [1.0, 0.5],
        None,
        None,
        -100,
        1,
        0.0,
        0.0,
        0.1,
        0.0,
        None,
        True,
    )
    torch.library.opcheck(torch.ops.eefast.linear_cross_entropy_multi.default, args)


@pytest.mark.parametrize("env", ["EEFAST_DISABLE_AVX2", "EEFAST_DISABLE_ONEDNN"])
def test_portable_row_kernels_and_aten_gemms_match_reference(env):
    """The non-AVX2 row passes (what CPUs without AVX2 run), or ATen's GEMMs instead of
    oneDNN's (what a torch without it runs), forced in a fresh process: trainable and frozen
    head, with a bias, over 37 rows (a partial vector of columns in the vocab-major passes)."""
    code = """
import torch, eefast
from eefast.ops.reference import linear_cross_entropy as linear_cross_entropy_reference
torch.manual_seed(0)
h = torch.randn(37, 24, requires_grad=True)
b = torch.randn(1003, requires_grad=True)
t = torch.randint(0, 1003, (37,))
t[::5] = -100
for trainable in (True, False):
    w = (torch.randn(1003, 24) / 3).requires_grad_(trainable)
    got = eefast.linear_cross_entropy(h, w, t, b if trainable else None, z_loss=1e-3)
    want = linear_cross_entropy_reference(h, w, t, b if trainable else None, z_loss=1e-3)
    inputs = (h, w, b) if trainable else (h,)
    for a, r in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, env: "1"}
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_multi_exit_per_exit_biases():
    g = torch.Generator().manual_seed(3)
    hiddens = [torch.randn(9, 8, generator=g) for _ in range(2)]
    weights = [torch.randn(50, 8, generator=g) for _ in range(2)]
    biases = [torch.randn(50, generator=g), None]
    targets = torch.randint(0, 50, (9,), generator=g)
    total, losses = eefast.multi_exit_cross_entropy(hiddens, weights, targets, [0.5, 2.0], biases)
    want = [
        linear_cross_entropy_reference(h, w, targets, b)
        for h, w, b in zip(hiddens, weights, biases, strict=True)
    ]
    torch.testing.assert_close(losses, torch.stack(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, 0.5 * want[0] + 2.0 * want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "terms",
    [
        {"label_smoothing": 0.1},
        {"softcap": 3.0},
        {"class_weight": True},
        {"label_smoothing": 0.2, "softcap": 2.0, "class_weight": True, "z_loss": 1e-3},
    ],  # fmt: skip
    ids=lambda t: ",".join(t),
)
def test_label_smoothing_softcap_and_class_weights_match_torch(dtype, reduction, terms):
    hidden, weight, bias, targets = make(37, 16, 300, "cpu", bias=True)
    hidden, weight = hidden.detach().to(dtype), weight.detach().to(dtype)
    bias = bias.detach().to(dtype)
    kw = dict(terms)
    if kw.pop("class_weight", False):
        kw["class_weight"] = torch.rand(300, generator=torch.Generator().manual_seed(3)) + 0.2
    results = []
    for fn in (eefast.linear_cross_entropy, linear_cross_entropy_reference):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        loss, lse = fn(h, w, targets, b, reduction=reduction, return_lse=True, **kw)
        loss.sum().backward()
        results.append((loss.float(), lse.float(), h.grad.float(), w.grad.float(), b.grad.float()))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_softcap_gemma2_matches_hf_gemma2_loss():
    """A softcapped head computes what HF's Gemma-2 computes (logits soft-capped at 30)."""
    hidden, weight, _, targets = make(20, 16, 200, "cpu")
    capped = 30.0 * torch.tanh(torch.nn.functional.linear(hidden, weight) / 30.0)
    want = torch.nn.functional.cross_entropy(capped, targets, ignore_index=-100)
    got = eefast.linear_cross_entropy(hidden, weight, targets, softcap=30.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

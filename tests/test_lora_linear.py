"""lora_linear against its pure-torch reference: values, gradients, opcheck, compile, errors."""

import pytest
import torch

import eefast
from eefast.ops.reference import lora_linear as lora_linear_reference

# (leading shape of x, in_features, out_features, r)
SHAPES = [
    ((2, 3), 37, 29, 5),  # odd sizes, 3-D x
    ((1,), 64, 64, 8),  # batch 1
    ((17,), 13, 7, 3),
    ((0,), 16, 8, 4),  # empty
    ((40,), 260, 300, 16),  # more features than one weight block (256), with a remainder
    ((3, 0, 5), 24, 12, 2),  # empty in the middle
]
# dtype -> tolerance of the output and grads relative to the largest reference value
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_inputs(lead, in_f, out_f, r, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    x = rand(*lead, in_f).requires_grad_()
    weight = rand(out_f, in_f, scale=in_f**-0.5)
    b = rand(out_f) if bias else None
    lora_a = rand(r, in_f, scale=in_f**-0.5).requires_grad_()
    lora_b = rand(out_f, r, scale=r**-0.5).requires_grad_()
    return x, weight, b, lora_a, lora_b


def fp32_reference(x, weight, bias, lora_a, lora_b, scaling, grad_out):
    """Reference values and grads in fp32 from the same (possibly bf16-rounded) inputs."""
    leaves = [t.detach().float().requires_grad_() for t in (x, lora_a, lora_b)]
    up = lambda t: None if t is None else t.float()  # noqa: E731
    y = lora_linear_reference(leaves[0], up(weight), up(bias), leaves[1], leaves[2], scaling)
    y.backward(grad_out.float())
    return y.detach(), *(t.grad for t in leaves)


def assert_close_rel(got, want, tol, what):
    got = got.float().cpu()
    want = want.float().cpu()
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = want.abs().max().item() if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-6), f"{what}: max abs err {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,in_f,out_f,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(device, dtype, lead, in_f, out_f, r, bias):
    x, weight, b, lora_a, lora_b = make_inputs(lead, in_f, out_f, r, dtype, device, bias)
    y = eefast.lora_linear(x, weight, b, lora_a, lora_b, 0.75)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    y.backward(grad_out)
    want = fp32_reference(x, weight, b, lora_a, lora_b, 0.75, grad_out)
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and x.grad.dtype == dtype and lora_a.grad.dtype == dtype
    for got, ref, what in zip(
        (y, x.grad, lora_a.grad, lora_b.grad),
        want,
        ("y", "grad_x", "grad_a", "grad_b"),
        strict=True,
    ):
        assert_close_rel(got, ref, tol, what)


def test_non_contiguous_inputs(device):
    x, weight, b, lora_a, lora_b = make_inputs((6, 5), 20, 12, 4, torch.float32, device)
    x_nc = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    w_nc = weight.t().contiguous().t()  # same values, column-major storage
    a_nc = torch.cat([lora_a.detach(), lora_a.detach()], 1)[:, ::2].clone()
    a_nc = a_nc.copy_(lora_a.detach()).requires_grad_()
    assert not x_nc.is_contiguous() and not w_nc.is_contiguous()
    y = eefast.lora_linear(x_nc, w_nc, b, a_nc, lora_b, 2.0)
    y.sum().backward()
    want = fp32_reference(x, weight, b, lora_a, lora_b, 2.0, torch.ones_like(y))
    for got, ref, what in zip(
        (y, x_nc.grad, a_nc.grad, lora_b.grad),
        want,
        ("y", "grad_x", "grad_a", "grad_b"),
        strict=True,
    ):
        assert_close_rel(got, ref, 1e-5, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_matches_reference_with_same_mask(device, dtype):
    x, weight, b, lora_a, lora_b = make_inputs((33,), 48, 40, 8, dtype, device)
    torch.manual_seed(123)
    y = eefast.lora_linear(x, weight, b, lora_a, lora_b, 0.5, dropout=0.3, training=True)
    y.sum().backward()
    got = [y.detach(), x.grad, lora_a.grad, lora_b.grad]

    leaves = [t.detach().float().requires_grad_() for t in (x, lora_a, lora_b)]
    torch.manual_seed(123)  # the same RNG draw gives the same dropout mask
    x_drop = torch.nn.functional.dropout(leaves[0].to(dtype), 0.3, True).float()
    ref = lora_linear_reference(
        leaves[0], weight.float(), b.float(), leaves[1], leaves[2], 0.5, x_lora=x_drop
    )
    ref.sum().backward()
    for g, w, what in zip(
        got,
        [ref.detach(), *(t.grad for t in leaves)],
        ("y", "grad_x", "grad_a", "grad_b"),
        strict=True,
    ):
        assert_close_rel(g, w, TOLERANCE[dtype], what)
    # dropout must actually have dropped something, else this test proves nothing
    plain = eefast.lora_linear(x, weight, b, lora_a, lora_b, 0.5)
    assert not torch.allclose(plain, y)


def test_eval_mode_ignores_dropout(device):
    x, weight, b, lora_a, lora_b = make_inputs((9,), 16, 16, 4, torch.float32, device)
    y_eval = eefast.lora_linear(x, weight, b, lora_a, lora_b, 1.0, dropout=0.5, training=False)
    y_plain = eefast.lora_linear(x, weight, b, lora_a, lora_b, 1.0)
    assert torch.equal(y_eval, y_plain)


def test_only_needed_grads(device):
    """Grads for x are skipped when x needs none; A and B still get theirs."""
    x, weight, b, lora_a, lora_b = make_inputs((7,), 16, 10, 2, torch.float32, device)
    x = x.detach()
    eefast.lora_linear(x, weight, b, lora_a, lora_b, 1.0).sum().backward()
    assert x.grad is None and lora_a.grad is not None and lora_b.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(device, dtype):
    x, weight, b, lora_a, lora_b = make_inputs((70,), 96, 80, 8, dtype, device)
    runs = []
    for _ in range(2):
        x.grad = lora_a.grad = lora_b.grad = None
        y = eefast.lora_linear(x, weight, b, lora_a, lora_b, 1.0)
        y.square().sum().backward()
        runs.append([y.detach().clone(), x.grad, lora_a.grad, lora_b.grad])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_dropout_input", [False, True])
def test_opcheck(device, dtype, with_dropout_input):
    x, weight, b, lora_a, lora_b = make_inputs((3, 5), 24, 20, 4, dtype, device)
    x_lora = (x.detach() * 0.5).requires_grad_() if with_dropout_input else None
    torch.library.opcheck(
        torch.ops.eefast.lora_linear.default, (x, weight, b, lora_a, lora_b, 0.5, x_lora)
    )
    y, xa = torch.ops.eefast.lora_linear.default(x, weight, b, lora_a, lora_b, 0.5, x_lora)
    grad = torch.randn_like(y)
    torch.library.opcheck(
        torch.ops.eefast.lora_linear_backward.default,
        (
            grad,
            weight,
            lora_a.detach(),
            lora_b.detach(),
            x.detach(),
            xa.detach(),
            0.5,
            True,
            with_dropout_input,
        ),
    )


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x, weight, b, lora_a, lora_b = make_inputs((4, 6), 32, 24, 4, torch.float32, device)

    def f(x, lora_a, lora_b):
        return eefast.lora_linear(x, weight, b, lora_a, lora_b, 0.5).relu().sum()

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(x, lora_a, lora_b)
    loss.backward()
    got = [loss.detach(), x.grad, lora_a.grad, lora_b.grad]
    x.grad = lora_a.grad = lora_b.grad = None
    f(x, lora_a, lora_b).backward()
    for g, w in zip(got[1:], (x.grad, lora_a.grad, lora_b.grad), strict=True):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(got[0], f(x, lora_a, lora_b).detach())


def _bad_input_cases():
    def base(**over):
        x, weight, b, lora_a, lora_b = make_inputs((4,), 8, 6, 2, torch.float32, "cpu")
        args = {"x": x, "weight": weight, "bias": b, "lora_a": lora_a, "lora_b": lora_b}
        args.update(over)
        return args

    f32 = lambda *s: torch.randn(*s)  # noqa: E731
    return [
        ("0-d x", base(x=torch.tensor(1.0)), "0-d"),
        ("int x", base(x=torch.ones(4, 8, dtype=torch.int64)), "x must be a float32"),
        ("int weight", base(weight=torch.ones(6, 8, dtype=torch.int32)), "weight has dtype"),
        ("mixed dtypes", base(lora_a=torch.randn(2, 8, dtype=torch.bfloat16)), "lora_a has dtype"),
        ("bias dtype", base(bias=torch.randn(6, dtype=torch.float64)), "bias has dtype"),
        ("in mismatch", base(x=f32(4, 9)), "in_features=8"),
        ("weight rank", base(weight=f32(6, 8, 1)), "weight must be 2-D"),
        ("lora_a in", base(lora_a=f32(2, 7)), "lora_a must be"),
        ("lora_b out", base(lora_b=f32(5, 2)), "lora_b must be"),
        ("rank mismatch", base(lora_b=f32(6, 3)), "ranks must match"),
        ("bias size", base(bias=f32(5)), "bias must be"),
        ("other device", base(weight=torch.randn(6, 8, device="meta")), "weight is on meta"),
    ]


@pytest.mark.parametrize(
    "name,args,message", _bad_input_cases(), ids=lambda c: c if isinstance(c, str) else ""
)
def test_bad_input_names_the_argument(name, args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.eefast.lora_linear.default(
            args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], 1.0, None
        )


def test_trainable_weight_is_rejected():
    x, weight, b, lora_a, lora_b = make_inputs((4,), 8, 6, 2, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="weight and bias are frozen"):
        eefast.lora_linear(x, weight.requires_grad_(), b, lora_a, lora_b, 1.0)

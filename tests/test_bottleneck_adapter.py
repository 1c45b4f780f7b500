"""bottleneck_adapter against its pure-torch reference: values, gradients, opcheck, compile,
errors. Series (residual = x) and parallel (a separate residual) forms, every activation."""

import pytest
import torch

import eefast
from eefast.ops import ADAPTER_ACTIVATIONS
from eefast.ops.reference import bottleneck_adapter as bottleneck_adapter_reference

# (leading shape of x, in_features, bottleneck, out_features or None for a series adapter)
SHAPES = [
    ((2, 3), 37, 5, None),  # odd sizes, 3-D x
    ((1,), 64, 16, None),  # batch 1
    ((17,), 13, 3, 29),  # parallel: out != in
    ((0,), 16, 4, None),  # empty
    ((3, 0, 5), 24, 2, 8),  # empty in the middle
    ((300,), 24, 4, None),  # more rows than one bf16 upcast chunk (256), with a remainder
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_inputs(lead, in_f, r, out_f, dtype, device, bias=True, learned_scale=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)
        return t.requires_grad_()

    out = in_f if out_f is None else out_f
    x = rand(*lead, in_f)
    residual = None if out_f is None else rand(*lead, out_f)
    args = {
        "x": x,
        "down_weight": rand(r, in_f, scale=in_f**-0.5),
        "down_bias": rand(r) if bias else None,
        "up_weight": rand(out, r, scale=r**-0.5),
        "up_bias": rand(out) if bias else None,
        "scale": torch.tensor(0.7, device=device, requires_grad=True) if learned_scale else 0.7,
        "residual": residual,
    }
    return args


def op_args(args, activation):
    """The raw op's positional arguments, in its schema's order."""
    names = ("x", "residual", "down_weight", "down_bias", "up_weight", "up_bias", "scale")
    return (*(args[n] for n in names), activation)


def leaves(args):
    return [t for t in args.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def fp32_reference(args, activation, grad_out):
    """Reference output and grads in fp32 from the same (possibly bf16-rounded) inputs."""
    up = {
        k: v.detach().float().requires_grad_() if isinstance(v, torch.Tensor) else v
        for k, v in args.items()
    }
    y = bottleneck_adapter_reference(**up, activation=activation)
    y.backward(grad_out.float())
    return y.detach(), [t.grad for t in leaves(up)]


def assert_close_rel(got, want, tol, what):
    got, want = got.float().cpu(), want.float().cpu()
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = want.abs().max().item() if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-6), f"{what}: max abs err {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,in_f,r,out_f", SHAPES)
@pytest.mark.parametrize("activation", sorted(ADAPTER_ACTIVATIONS))
def test_matches_reference(device, dtype, lead, in_f, r, out_f, activation):
    args = make_inputs(lead, in_f, r, out_f, dtype, device, learned_scale=(in_f % 2 == 1))
    y = eefast.bottleneck_adapter(**args, activation=activation)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    y.backward(grad_out)
    want_y, want_grads = fp32_reference(args, activation, grad_out)
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype
    assert_close_rel(y, want_y, tol, "out")
    for i, (t, want) in enumerate(zip(leaves(args), want_grads, strict=True)):
        assert t.grad is not None, f"input {i} got no gradient"
        assert_close_rel(t.grad, want, tol, f"grad of input {i}")


@pytest.mark.parametrize("bias", [True, False])
def test_without_biases_and_frozen_inputs(device, bias):
    args = make_inputs((4, 3), 20, 6, None, torch.float32, device, bias=bias)
    args["x"].requires_grad_(False)
    y = eefast.bottleneck_adapter(**args, activation="silu")
    y.square().sum().backward()
    ref_args = {
        k: v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
        for k, v in args.items()
    }
    bottleneck_adapter_reference(**ref_args, activation="silu").square().sum().backward()
    assert args["x"].grad is None
    for name in ("down_weight", "up_weight", "down_bias", "up_bias"):
        if args[name] is not None:
            torch.testing.assert_close(args[name].grad, ref_args[name].grad)


def test_zero_up_projection_is_identity(device):
    args = make_inputs((5,), 16, 4, None, torch.float32, device)
    with torch.no_grad():
        args["up_weight"].zero_()
        args["up_bias"].zero_()
    y = eefast.bottleneck_adapter(**args)
    assert torch.equal(y, args["x"])


def test_deterministic(device):
    runs = []
    for _ in range(2):
        args = make_inputs((64,), 48, 8, None, torch.float32, device, learned_scale=True)
        y = eefast.bottleneck_adapter(**args, activation="gelu")
        y.square().sum().backward()
        runs.append([y.detach()] + [t.grad for t in leaves(args)])
    if device.type == "cpu":  # the contract: CPU results are bitwise reproducible
        for a, b in zip(*runs, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parallel", [False, True])
def test_opcheck(device, dtype, parallel):
    args = make_inputs((3, 5), 24, 4, 20 if parallel else None, dtype, device, learned_scale=True)
    call = op_args(args, "gelu_tanh")
    torch.library.opcheck(torch.ops.eefast.bottleneck_adapter.default, call)
    y, z = torch.ops.eefast.bottleneck_adapter.default(*call)
    torch.library.opcheck(
        torch.ops.eefast.bottleneck_adapter_backward.default,
        (
            torch.randn_like(y),
            args["x"].detach(),
            args["down_weight"].detach(),
            args["up_weight"].detach(),
            args["up_bias"].detach(),
            z,
            args["scale"].detach(),
            "gelu_tanh",
            not parallel,
            True,
            True,
        ),
    )


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    args = make_inputs((4, 6), 32, 8, None, torch.float32, device, learned_scale=True)

    def f(a):
        return eefast.bottleneck_adapter(**a, activation="relu").tanh().sum()

    loss = torch.compile(f, fullgraph=True)(args)
    loss.backward()
    got = [loss.detach()] + [t.grad.clone() for t in leaves(args)]
    for t in leaves(args):
        t.grad = None
    want = f(args)
    want.backward()
    torch.testing.assert_close(got[0], want.detach())
    for g, t in zip(got[1:], leaves(args), strict=True):
        torch.testing.assert_close(g, t.grad)


def _bad_input_cases():
    def base(**over):
        a = make_inputs((4,), 8, 2, None, torch.float32, "cpu")
        a["scale"] = torch.tensor(1.0)
        a.update(over)
        return a

    f32 = lambda *s: torch.randn(*s)  # noqa: E731
    return [
        ("0-d x", base(x=torch.tensor(1.0)), "0-d"),
        ("int x", base(x=torch.ones(4, 8, dtype=torch.int64)), "x must be a float32"),
        ("mixed dtypes", base(up_weight=f32(8, 2).double()), "up_weight has dtype"),
        ("down in", base(down_weight=f32(2, 7)), "down_weight must be"),
        ("up rank", base(up_weight=f32(8, 3)), "up_weight must be"),
        ("down bias", base(down_bias=f32(3)), "down_bias must be"),
        ("up bias", base(up_bias=f32(7)), "up_bias must be"),
        ("series out", base(up_weight=f32(6, 2), up_bias=None), "without a residual"),
        ("residual shape", base(residual=f32(3, 8)), "residual must be"),
        ("scale size", base(scale=torch.ones(2)), "scale must hold one element"),
        (
            "scale dtype",
            base(scale=torch.tensor(1.0, dtype=torch.float64)),
            "scale must be float32",
        ),
        ("other device", base(up_weight=torch.randn(8, 2, device="meta")), "up_weight is on meta"),
        ("activation", base(activation="swish"), "unknown activation 'swish'"),
    ]


@pytest.mark.parametrize(
    "name,args,message", _bad_input_cases(), ids=lambda c: c if isinstance(c, str) else ""
)
def test_bad_input_names_the_argument(name, args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.eefast.bottleneck_adapter.default(*op_args(args, args.get("activation", "relu")))

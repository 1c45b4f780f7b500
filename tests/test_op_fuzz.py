"""Seeded, bounded fuzzing of every op: each case either matches the pure-torch reference or is
refused, and the fake kernel (what torch.compile traces) refuses exactly what the kernel does.

A case starts valid and gets up to two random faults: another dtype (float64, int64) or device
(meta) for one argument, a wrong size in one dimension, an empty dimension, a non-finite or
out-of-range hyper-parameter.
"""

import math
import random

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import eefast
from eefast.ops import reference

CASES = 150
BAD_FLOATS = (float("nan"), float("inf"), -1.0, 0.0, 3e-39)


def _run(fn, args: dict):
    try:
        return True, fn(**args)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        return False, e


def _fake_accepts(fn, args: dict) -> bool:
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def conv(v):
        if isinstance(v, torch.Tensor):
            return mode.from_tensor(v)
        if isinstance(v, tuple | list):
            return type(v)(conv(x) for x in v)
        return v

    fake = {k: conv(v) for k, v in args.items()}
    with mode:
        return _run(fn, fake)[0]


def _fault(rng: random.Random, args: dict, tensors: list[str], floats: list[str]) -> str:
    kind = rng.choice(["dtype", "device", "size", "empty", "float"] if floats else
                      ["dtype", "device", "size", "empty"])  # fmt: skip
    if kind == "float":
        name = rng.choice(floats)
        args[name] = rng.choice(BAD_FLOATS)
        return f"{name}={args[name]}"
    name = rng.choice(tensors)
    t = args[name]
    if t is None:
        return "none"
    if kind == "dtype":
        args[name] = t.to(rng.choice([torch.float64, torch.int64]))
    elif kind == "device":
        args[name] = t.to("meta")
    elif kind == "size" and t.dim():
        shape = list(t.shape)
        shape[rng.randrange(len(shape))] += rng.choice([1, 2])
        args[name] = torch.randn(shape).to(t.dtype) if t.is_floating_point() else t.new_zeros(shape)
    elif kind == "empty" and t.dim():
        args[name] = t.narrow(rng.randrange(t.dim()), 0, 0)
    return f"{kind} {name}"


def _finite_inputs(args: dict) -> bool:
    return all(
        not isinstance(v, torch.Tensor) or v.device.type != "meta" and
        (not v.is_floating_point() or bool(torch.isfinite(v).all()))
        for v in args.values()
    )  # fmt: skip


def _check_case(fn, ref, args, what, atol=1e-4):
    ok, got = _run(fn, args)
    assert ok == _fake_accepts(fn, args), f"{what}: kernel {'accepts' if ok else 'refuses'} " \
        f"but the fake does not ({got if not ok else ''})"  # fmt: skip
    if ok and _finite_inputs(args):
        want = ref(**args)
        got, want = (
            (got if isinstance(got, tuple) else (got,)),
            (want if isinstance(want, tuple) else (want,)),
        )
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=1e-3, msg=what)


def _lora_args(rng):
    n, i, o, r = rng.randint(1, 5), rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 4)
    return {
        "x": torch.randn(n, i), "weight": torch.randn(o, i),
        "bias": torch.randn(o) if rng.random() < 0.5 else None,
        "lora_a": torch.randn(r, i), "lora_b": torch.randn(o, r), "scaling": rng.uniform(0, 2),
    }  # fmt: skip


def _bottleneck_args(rng):
    n, d, r = rng.randint(1, 5), rng.randint(1, 9), rng.randint(1, 4)
    parallel = rng.random() < 0.5
    o = rng.randint(1, 9) if parallel else d
    return {
        "x": torch.randn(n, d), "down_weight": torch.randn(r, d),
        "down_bias": torch.randn(r), "up_weight": torch.randn(o, r), "up_bias": torch.randn(o),
        "scale": rng.uniform(0, 2), "residual": torch.randn(n, o) if parallel else None,
    }  # fmt: skip


def _exit_stats_args(rng):
    n, d, v = rng.randint(1, 5), rng.randint(1, 9), rng.randint(1, 40)
    return {
        "hidden": torch.randn(n, d), "weight": torch.randn(v, d),
        "bias": torch.randn(v) if rng.random() < 0.5 else None,
        "temperature": rng.uniform(0.5, 2),
    }  # fmt: skip


def _lce_args(rng):
    n, d, v = rng.randint(1, 6), rng.randint(1, 9), rng.randint(1, 40)
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < 0.3] = -100
    return {
        "hidden": torch.randn(n, d), "weight": torch.randn(v, d), "targets": targets,
        "bias": torch.randn(v) if rng.random() < 0.5 else None,
        "z_loss": rng.choice([0.0, 1e-3]), "reduction": rng.choice(["mean", "sum", "none"]),
        "label_smoothing": rng.choice([0.0, 0.1]), "softcap": rng.choice([0.0, 5.0]),
    }  # fmt: skip


def _decode_linear_args(rng):
    n, i, o = rng.randint(1, 12), rng.randint(1, 9), rng.randint(1, 9)
    return {
        "x": torch.randn(n, i), "weight": torch.randn(o, i),
        "bias": torch.randn(o) if rng.random() < 0.5 else None,
    }  # fmt: skip


def _decode_linear_ref(x, weight, bias=None):
    return torch.nn.functional.linear(
        x.float(), weight.float(), None if bias is None else bias.float()
    )


OPS = {
    "lora_linear": (eefast.lora_linear, reference.lora_linear, _lora_args,
                    ["x", "weight", "bias", "lora_a", "lora_b"], ["scaling"]),
    "bottleneck_adapter": (eefast.bottleneck_adapter, reference.bottleneck_adapter,
                           _bottleneck_args,
                           ["x", "down_weight", "down_bias", "up_weight", "up_bias", "residual"],
                           ["scale"]),
    "exit_stats": (eefast.exit_stats, reference.exit_stats, _exit_stats_args,
                   ["hidden", "weight", "bias"], ["temperature"]),
    "linear_cross_entropy": (eefast.linear_cross_entropy, reference.linear_cross_entropy,
                             _lce_args, ["hidden", "weight", "targets", "bias"],
                             ["z_loss", "label_smoothing", "softcap"]),
    "decode_linear": (eefast.decode_linear, _decode_linear_ref, _decode_linear_args,
                      ["x", "weight", "bias"], []),
}  # fmt: skip


@pytest.mark.parametrize("op", sorted(OPS))
def test_fuzz_matches_reference_or_refuses_like_the_fake(op):
    fn, ref, make, tensors, floats = OPS[op]
    rng = random.Random(f"eefast-{op}")
    refused = 0
    for case in range(CASES):
        args = make(rng)
        faults = [_fault(rng, args, tensors, floats) for _ in range(rng.choice([0, 1, 1, 2]))]
        what = f"{op} case {case}: {', '.join(faults) or 'valid'}"
        ok_before = _run(fn, args)[0]
        refused += not ok_before
        _check_case(fn, ref, args, what)
    assert 0 < refused < CASES  # the fuzzing exercises both sides


def test_nan_in_an_ignored_row_contributes_nothing():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(16, 8, requires_grad=True)
    targets = torch.tensor([3, -100, 5, -100])
    poisoned = hidden.detach().clone()
    poisoned[1], poisoned[3] = float("nan"), float("inf")
    poisoned.requires_grad_()
    clean = hidden.detach().clone()
    clean[1], clean[3] = 0.0, 0.0
    clean.requires_grad_()
    for reduction in ("mean", "sum", "none"):
        w1, w2 = weight.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        got = eefast.linear_cross_entropy(poisoned, w1, targets, reduction=reduction)
        want = eefast.linear_cross_entropy(clean, w2, targets, reduction=reduction)
        torch.testing.assert_close(got, want)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(w1.grad, w2.grad)
        assert torch.isfinite(poisoned.grad).all() and not poisoned.grad[[1, 3]].any()
        poisoned.grad = clean.grad = None
    assert not math.isnan(float(eefast.linear_cross_entropy(poisoned, weight, targets, z_loss=1.0)))


@pytest.mark.parametrize("shape", [(3, 0, 4, 2), (3, 5, 4, 0), (0, 5, 4, 2), (3, 5, 0, 2)])
def test_lora_linear_with_an_empty_dimension_matches_the_reference(shape):
    n, i, o, r = shape
    leaves = [torch.randn(n, i), torch.randn(r, i), torch.randn(o, r)]
    weight = torch.randn(o, i)
    grads = []
    for fn in (eefast.lora_linear, reference.lora_linear):
        x, a, b = (t.clone().requires_grad_() for t in leaves)
        y = fn(x, weight, None, a, b, 0.5)
        y.sum().backward()
        grads.append((y, x.grad, a.grad, b.grad))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape", [(2, 0, 3), (0, 4, 3), (2, 4, 0)])
def test_decode_linear_and_bottleneck_with_an_empty_dimension(shape):
    n, i, o = shape
    x, w = torch.randn(n, i, requires_grad=True), torch.randn(o, i, requires_grad=True)
    eefast.decode_linear(x, w).sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and not w.grad.any()
    h = torch.randn(n, i, requires_grad=True)
    down, up = torch.randn(o, i, requires_grad=True), torch.randn(i, o, requires_grad=True)
    eefast.bottleneck_adapter(h, down, None, up, None, 1.0).sum().backward()
    assert h.grad.shape == h.shape and down.grad.shape == down.shape


def test_exit_stats_reads_a_head_that_requires_grad_and_infinite_logits():
    weight = torch.randn(40, 8, requires_grad=True)
    hidden = torch.randn(20, 8)  # more rows than the few-row path
    got, want = eefast.exit_stats(hidden, weight), reference.exit_stats(hidden, weight.detach())
    torch.testing.assert_close(got.max_prob, want.max_prob)
    weight = torch.randn(40, 8)
    weight[3] = float("inf")
    got = eefast.exit_stats(torch.ones(2, 8), weight)
    assert torch.isinf(got.lse).all() and (got.argmax == 3).all()  # torch: lse inf, not NaN
    assert torch.isinf(reference.exit_stats(torch.ones(2, 8), weight).lse).all()


@pytest.mark.parametrize("kw", [{"temperature": float("nan")}, {"top_p": float("nan")},
                                {"temperature": float("inf")}, {"top_k": -1}])  # fmt: skip
def test_sampling_refuses_non_finite_settings(kw):
    from eefast.generation import Sampling

    with pytest.raises(ValueError):
        Sampling(**kw)


def _decode_block_args(rng):
    d, hd, kv, group, inner = 16, 4, rng.randint(1, 2), rng.randint(1, 2), rng.randint(4, 12)
    heads = kv * group
    batch, q, cache_len = rng.randint(1, 3), rng.randint(1, 3), rng.randint(0, 4)
    slots = cache_len + q + rng.randint(0, 2)
    shapes = [(heads * hd, d), (kv * hd, d), (kv * hd, d), (d, heads * hd), (inner, d),
              (inner, d), (d, inner)]  # fmt: skip
    allowed = torch.rand(batch, q, cache_len + q) < 0.8
    return {
        "h": torch.randn(batch, q, d), "cos": torch.randn(batch, q, hd),
        "sin": torch.randn(batch, q, hd), "allowed": allowed,
        "k_cache": torch.randn(batch, kv, slots, hd), "v_cache": torch.randn(batch, kv, slots, hd),
        "cache_len": cache_len, "norms": (torch.rand(d) + 0.5, torch.rand(d) + 0.5),
        "weights": [torch.randn(s) * s[1] ** -0.5 for s in shapes],
        "biases": [torch.randn(s[0]) * 0.1 if i < 3 and rng.random() < 0.5 else None
                   for i, s in enumerate(shapes)],
        "eps": 1e-5, "scaling": hd**-0.5,
    }  # fmt: skip


def test_fuzz_decode_block():
    """decode_block's kernel and fake refuse alike; an accepted call matches the reference,
    caches included."""
    rng = random.Random("eefast-decode_block")
    names = ["h", "cos", "sin", "allowed", "k_cache", "v_cache"]
    accepted = 0
    for case in range(60):
        args = make = _decode_block_args(rng)
        faults = []
        for _ in range(rng.choice([0, 1, 1, 2])):
            if rng.random() < 0.3:  # a projection or a norm
                i = rng.randrange(7)
                args["weights"][i] = args["weights"][i].to(rng.choice([torch.float64, "meta"]))
                faults.append(f"weight {i}")
            else:
                faults.append(_fault(rng, args, names, ["cache_len"] if rng.random() < 0.2 else []))
        if isinstance(args["cache_len"], float):
            args["cache_len"] = -1  # the op takes an int: the float fault means "out of range"
        what = f"decode_block case {case}: {', '.join(faults) or 'valid'}"
        want_caches = (make["k_cache"].clone(), make["v_cache"].clone())

        def op(**a):
            return eefast.decode_block(**a)

        ok, got = _run(op, {**args, "k_cache": args["k_cache"].clone(),
                            "v_cache": args["v_cache"].clone()})  # fmt: skip
        assert ok == _fake_accepts(op, args), f"{what}: kernel {'accepts' if ok else 'refuses'}"
        accepted += ok
        if ok and _finite_inputs({k: v for k, v in args.items() if isinstance(v, torch.Tensor)}):
            want = reference.decode_block(**{**args, "k_cache": want_caches[0],
                                             "v_cache": want_caches[1]})  # fmt: skip
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=what)
    assert 0 < accepted < 60

"""The weight-only int8 backbone: decode_linear_q8 against dequantise-then-linear (odd shapes,
1-9 rows and more, float32/bf16, bias), rows computed alike whatever the call, gradients,
opcheck and errors; quantize_rows; and generation on an int8 backbone, whose every mode equals
that model's own full-depth greedy output."""

import pytest
import torch
import torch.nn.functional as F

from eefast.exits import add_exits, load_exits, save_exits
from eefast.generation import generate
from eefast.hf.quantize import quantize_backbone
from eefast.nn import QuantizedLinear
from eefast.ops import decode_linear_q8, quantize_rows, reference
from test_decode_linear import SHAPES, make
from test_generation import StubTokenizer, ragged_prompts
from tiny_models import tiny_model


def quantized(lead, k, n, dtype, device, bias):
    x, w, b = make(lead, k, n, dtype, device, bias)
    q, s = quantize_rows(w)
    return x, q, s, b


@pytest.mark.parametrize("lead,k,n", [*SHAPES, ((9,), 33, 17), ((1,), 576, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_dequantise_then_linear(device, lead, k, n, dtype, bias):
    x, q, s, b = quantized(lead, k, n, dtype, device, bias)
    got = decode_linear_q8(x, q, s, b)
    want = reference.decode_linear_q8(x, q, s, b)
    assert got.dtype == dtype and got.shape == (*lead, n)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("n", [5, 130, 1536])  # the one-row kernel takes four rows of W at once
def test_a_row_gives_the_same_bits_alone_or_in_a_batch(n):
    x, q, s, _ = quantized((8,), 200, n, torch.float32, "cpu", False)
    alone = torch.cat([decode_linear_q8(x[i : i + 1], q, s) for i in range(8)])
    for rows in (2, 3, 5, 8):
        batch = decode_linear_q8(x[:rows], q, s)
        assert torch.equal(batch, alone[:rows]), rows


def test_quantize_rows_rounds_each_row_to_its_own_scale():
    w = torch.randn(7, 50)
    w[3] = 0  # an all-zero row
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (7,) and int(q.abs().max()) == 127
    assert s[3] == 1 and not q[3].any()
    error = (q.float() * s[:, None] - w).abs()
    assert bool((error <= s[:, None] / 2 + 1e-7).all())


def test_gradients_flow_to_x_and_bias(device):
    x, q, s, b = quantized((3,), 40, 24, torch.float32, device, True)
    x.requires_grad_(True)
    b.requires_grad_(True)
    decode_linear_q8(x, q, s, b).square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    F.linear(x2, q.float() * s[:, None], b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.grad, b2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 4, 12])
def test_opcheck(device, rows):
    x, q, s, b = quantized((rows,), 48, 40, torch.float32, device, True)
    torch.library.opcheck(torch.ops.eefast.decode_linear_q8.default, (x, q, s, b))


def test_bad_input_is_refused(device):
    x, q, s, _ = quantized((2,), 16, 8, torch.float32, device, False)
    cases = [
        ((x, q.float(), s), "qweight must be int8"),
        ((x, q, s[:4]), "scales must be float32"),
        ((x, q, s.double()), "scales must be float32"),
        ((x[:, :8], q, s), "last dim"),
        ((x.long(), q, s), "x must be float|x dtype torch.int64 is not"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            decode_linear_q8(*args)
        with pytest.raises(RuntimeError, match=message), torch._subclasses.FakeTensorMode() as m:
            decode_linear_q8(*(m.from_tensor(a) for a in args))


# -- generation on an int8 backbone ------------------------------------------------------


def low_bit_model(arch, weights="int8"):
    config = {"initializer_range": 0.2} if arch == "llama" else {}
    return quantize_backbone(tiny_model(arch, **config), weights)


@torch.no_grad()
def own_greedy(model, prompt, new, eos):
    """A low-bit model's greedy tokens, one full uncached forward per token, with the LM
    head's low-bit copy (what generation's final logits read) through its reference. (Few
    rows: a GGUF backbone's linears then round activations as in decoding.)"""
    head, seq = model.get_output_embeddings(), list(prompt)
    for _ in range(new):
        h = model.base_model(torch.tensor([seq])).last_hidden_state[:, -1]
        if head.scales is not None:
            logits = reference.decode_linear_q8(h, head.qweight, head.scales)
        else:
            logits = reference.decode_linear_gguf(h, head.qweight)
        seq.append(int(logits.argmax()))
        if seq[-1] == eos:
            break
    return seq[len(prompt) :]


def assert_every_mode_is_its_own_greedy(model):
    """Every mode on ``model`` (exits 1 and 2) equals its own greedy, at batch 3 and 1."""
    ee = add_exits(model, [1, 2], kind="norm")
    tok = StubTokenizer(model.config.eos_token_id)
    prompts = ragged_prompts()
    want = [own_greedy(model, p, 16, tok.eos_token_id) for p in prompts]
    for kw in (dict(mode="full"), dict(mode="speculative", exit_layer=2, threshold=0.0),
               dict(mode="speculative", exits=[1, 2], threshold=0.015),
               dict(mode="threshold", threshold=1.5)):  # fmt: skip
        assert generate(ee, tok, prompts, max_new_tokens=16, **kw).tokens == want, kw
        assert generate(ee, tok, prompts[:1], max_new_tokens=16, **kw).tokens == want[:1], kw


def block_formats(model):
    return {m.kind for m in model.modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_every_mode_on_an_int8_backbone_is_its_own_greedy(arch):
    """On the CPU with widths in groups of 32, int8 is GGUF Q8_0 blocks (head included)."""
    model = low_bit_model(arch)
    blocks = model.get_decoder().layers if arch != "gpt2" else model.transformer.h
    assert all(type(m) is not torch.nn.Linear for m in blocks.modules()), "blocks are int8"
    assert block_formats(model) == {"q8_0"}
    assert model.get_output_embeddings().scales is None  # a Q8_0 head copy
    assert_every_mode_is_its_own_greedy(model)


def test_int8_is_per_row_where_a_width_is_not_in_groups_of_32():
    """Weight-only int8 with a scale per output row (what CUDA gets too) where Q8_0's groups
    do not fit: hidden width 48."""
    model = tiny_model("llama", hidden_size=48, initializer_range=0.2)
    model = quantize_backbone(model, "int8")
    assert block_formats(model) == {"int8"}
    assert model.get_output_embeddings().scales is not None
    assert_every_mode_is_its_own_greedy(model)


@pytest.mark.parametrize("kind", ["mlp", "layer", "draft"])
def test_exits_of_an_int8_backbone_stay_float_and_save_like_float_ones(kind, tmp_path):
    model = low_bit_model("llama")
    layers = [4] if kind == "draft" else [1, 2]
    ee = add_exits(model, layers, kind=kind, share_lm_head=False)
    assert not any(isinstance(m, QuantizedLinear) for m in ee.exits.modules())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in ee.exit_parameters())
    assert not any(name.endswith(("qweight", "scales")) for name in ee.exits.state_dict())
    save_exits(ee, tmp_path)
    float_model = tiny_model("llama", initializer_range=0.2)
    assert load_exits(float_model, tmp_path).exit_layers == layers  # the same exits file


def test_bad_backbone_requests():
    from eefast.hf import load_model

    model = low_bit_model("llama")
    with pytest.raises(ValueError, match="already low-bit"):
        quantize_backbone(model)
    with pytest.raises(ValueError, match="must be 'int8' or 'q4'"):
        quantize_backbone(tiny_model("llama"), "q2")
    with pytest.raises(ValueError, match="weights must be one of"):
        load_model("smollm2", weights="q2")


def test_the_avx2_kernel_where_there_is_no_avx512():
    """This CPU may take the AVX-512 kernel; the AVX2 one (EEFAST_DISABLE_AVX512=1) must give
    the reference's values and row-independent bits as well."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, eefast; from eefast.ops import decode_linear_q8, quantize_rows, reference\n"
        "x = torch.randn(6, 200); q, s = quantize_rows(torch.randn(130, 200))\n"
        "alone = torch.cat([decode_linear_q8(x[i:i+1], q, s) for i in range(6)])\n"
        "assert torch.equal(decode_linear_q8(x, q, s), alone)\n"
        "want = reference.decode_linear_q8(x, q, s)\n"
        "torch.testing.assert_close(alone, want, atol=1e-4, rtol=1e-5)"
    )
    env = {**os.environ, "EEFAST_DISABLE_AVX512": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

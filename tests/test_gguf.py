"""GGUF blocks (Q4_0, Q4_1, Q8_0) as decode weights: packing and dequantisation against the
gguf package's own, quantize_gguf bit for bit against llama.cpp's reference quantiser,
decode_linear_gguf against its reference (odd shapes, tail rows, 1-8 rows and more, float32 and
bf16, bias), rows alike whatever the call, both kernel builds, gradients, opcheck and errors;
a q4 backbone read from a GGUF file written here; and generation on a q4 backbone, whose every
mode equals that model's own full-depth greedy output."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eefast.hf.arch import decoder_parts
from eefast.hf.quantize import quantize_backbone
from eefast.nn import QuantizedLinear
from eefast.ops import (
    decode_linear_gguf,
    dequantize_gguf,
    gguf_type,
    pack_gguf,
    quantize_gguf,
    reference,
)
from test_int8 import assert_every_mode_is_its_own_greedy, low_bit_model
from tiny_models import tiny_model

gguf = pytest.importorskip("gguf")
TYPES = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
         "q8_0": gguf.GGMLQuantizationType.Q8_0}  # fmt: skip
KINDS = list(TYPES)


def file_rows(w: torch.Tensor, kind: str) -> torch.Tensor:
    """w's blocks as a GGUF file stores them, quantised by the gguf package."""
    blocks = gguf.quants.quantize(w.float().numpy(), TYPES[kind])
    return torch.from_numpy(blocks).view(w.shape[0], w.shape[1] // 32, -1)


def weight(out, n_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * 0.1
    w[0, :32] = 0  # an all-zero block
    w[-1, 32:64] = 0.5  # a constant block (Q4_1's d is 0)
    return w


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out,n_in", [(8, 32), (13, 64), (203, 576), (64, 96)])
def test_packed_blocks_dequantise_to_the_gguf_packages_values(kind, out, n_in):
    rows = file_rows(weight(out, n_in), kind)
    packed = pack_gguf(rows)
    assert packed.shape == rows.shape and gguf_type(packed) == kind
    want = gguf.quants.dequantize(rows.reshape(out, -1).numpy(), TYPES[kind])
    assert torch.equal(dequantize_gguf(packed), torch.from_numpy(np.ascontiguousarray(want)))
    assert sorted(packed.flatten().tolist()) == sorted(rows.flatten().tolist())  # same bytes


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_gguf_is_llama_cpps_quantiser_bit_for_bit(kind):
    w = weight(37, 160, seed=3)
    w[5, 64:96] = -w[5, 64:96].abs()  # Q4_0's largest magnitude negative
    assert torch.equal(quantize_gguf(w, kind), pack_gguf(file_rows(w, kind)))


SHAPES = [((1,), 64, 8), ((3,), 64, 13), ((2, 3), 96, 40), ((8,), 576, 203), ((1,), 576, 1536),
          ((9,), 64, 24), ((4, 5), 128, 16), ((70,), 64, 24)]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lead,n_in,out", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_its_reference(kind, lead, n_in, out, dtype, bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, n_in, generator=g).to(dtype)
    b = (torch.randn(out, generator=g) * 0.1).to(dtype) if bias else None
    q = quantize_gguf(weight(out, n_in), kind)
    got = decode_linear_gguf(x, q, b)
    assert got.dtype == dtype and got.shape == (*lead, out)
    want = reference.decode_linear_gguf(x, q, b)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # and the quantised activations cost little against plain float math
    plain = F.linear(x.float(), dequantize_gguf(q), None if b is None else b.float())
    torch.testing.assert_close(got.float(), plain, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_a_row_gives_the_same_bits_alone_or_in_a_batch(kind):
    x = torch.randn(8, 96)
    q = quantize_gguf(weight(43, 96), kind)  # two tiles of 16 rows and a tail of 11
    alone = torch.cat([decode_linear_gguf(x[i : i + 1], q) for i in range(8)])
    for rows in (2, 3, 5, 8):
        assert torch.equal(decode_linear_gguf(x[:rows], q), alone[:rows]), rows


def test_every_kernel_build_and_the_portable_path():
    """This CPU may take the AVX-512 VNNI or the AVX-VNNI build; the 256-bit builds
    (EEFAST_DISABLE_AVX512=1) and the AVX2 one (and EEFAST_DISABLE_AVXVNNI=1) must give the
    same bits, and without AVX2 (EEFAST_DISABLE_AVX2=1) the weight is dequantised."""
    code = (
        "import sys, torch, eefast; from eefast.ops import decode_linear_gguf, quantize_gguf\n"
        "torch.manual_seed(0); x = torch.randn(7, 96)\n"
        "for k in ('q4_0', 'q4_1', 'q8_0'):\n"
        "    y = decode_linear_gguf(x, quantize_gguf(torch.randn(43, 96), k))\n"
        "    sys.stdout.buffer.write(y.numpy().tobytes())\n"
    )

    def run(**env):
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                              capture_output=True)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return torch.frombuffer(bytearray(done.stdout), dtype=torch.float32)

    default, portable = run(), run(EEFAST_DISABLE_AVX2="1")
    avx256 = run(EEFAST_DISABLE_AVX512="1")
    avx2 = run(EEFAST_DISABLE_AVX512="1", EEFAST_DISABLE_AVXVNNI="1")
    assert torch.equal(default, avx256)
    assert torch.equal(default, avx2)
    assert (portable - default).norm() < 0.02 * default.norm()  # float activations there


def test_gradients_flow_to_x_and_bias():
    q = quantize_gguf(weight(24, 64), "q4_1")
    x = torch.randn(3, 64, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    decode_linear_gguf(x, q, b).square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    straight_through = reference.quantize_activations(x2.detach()) + (x2 - x2.detach())
    F.linear(straight_through, dequantize_gguf(q), b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.grad, b2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 4, 12])
def test_opcheck(rows):
    q = quantize_gguf(weight(40, 64), "q4_1")
    x, b = torch.randn(rows, 64), torch.randn(40)
    torch.library.opcheck(torch.ops.eefast.decode_linear_gguf.default, (x, q, b))
    torch.library.opcheck(torch.ops.eefast.dequantize_gguf.default, (q,))
    torch.library.opcheck(torch.ops.eefast.pack_gguf.default, (file_rows(weight(40, 64), "q8_0"),))


def test_bad_input_is_refused():
    q = quantize_gguf(weight(8, 64), "q4_1")
    x = torch.randn(2, 64)
    cases = [
        ((x, q.view(torch.int8)), "must be GGUF blocks"),
        ((x, q[..., :19]), "must be GGUF blocks"),
        ((x, q[0]), "must be GGUF blocks"),
        ((x[:, :32], q), "last dim"),
        ((x.long(), q), "x must be float|x dtype torch.int64 is not"),
        ((x, q, torch.randn(7)), "bias must be"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            decode_linear_gguf(*args)
        with pytest.raises(RuntimeError, match=message), torch._subclasses.FakeTensorMode() as m:
            decode_linear_gguf(*(m.from_tensor(a) for a in args))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        quantize_gguf(torch.randn(4, 48), "q4_1")
    with pytest.raises(RuntimeError, match="kind must be one of"):
        quantize_gguf(torch.randn(4, 64), "q5_k")


# -- a q4 backbone ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_every_mode_on_a_q4_backbone_is_its_own_greedy(arch):
    model = low_bit_model(arch, "q4")
    blocks = decoder_parts(model).layers
    assert {m.kind for m in blocks.modules() if isinstance(m, QuantizedLinear)} == {"q4_1"}
    assert gguf_type(model.get_output_embeddings().qweight) == "q8_0"
    assert_every_mode_is_its_own_greedy(model)


def write_llama_gguf(model, path, heads_order="llama.cpp", skip=()):
    """A GGUF file of a tiny llama's linears as llama.cpp's converter writes them: Q4_1 blocks
    of q and k with each head's rotary halves interleaved, the head as Q8_0."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name in skip:
            continue
        w = m.weight.detach()
        heads = {"q_proj": config.num_attention_heads,
                 "k_proj": config.num_key_value_heads}.get(name.rsplit(".", 1)[-1])  # fmt: skip
        if heads is not None and heads_order == "llama.cpp":
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, -1).transpose(1, 2).reshape(w.shape)
        kind = "q8_0" if name == "lm_head" else "q4_1"
        blocks = gguf.quants.quantize(w.float().numpy(), TYPES[kind])
        writer.add_tensor(names.get_name(name) + ".weight", blocks, raw_dtype=TYPES[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_q4_backbone_read_from_a_gguf_file_is_bit_for_bit_its_blocks(tmp_path):
    model = tiny_model("llama")
    write_llama_gguf(model, tmp_path / "m.gguf")
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}  # fmt: skip
    quantize_backbone(model, "q4", gguf=tmp_path / "m.gguf")
    low_bit = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(low_bit) == 7 * model.config.num_hidden_layers
    for name, m in low_bit.items():  # rows in HF's order again: q and k's heads un-interleaved
        assert torch.equal(m.qweight, quantize_gguf(floats[name], "q4_1")), name
    assert torch.equal(model.lm_head.qweight, quantize_gguf(floats["lm_head"], "q8_0"))
    assert torch.equal(model.lm_head.weight, floats["lm_head"])  # exits read the float head


def test_bad_gguf_files_are_refused(tmp_path):
    model = tiny_model("llama")
    write_llama_gguf(model, tmp_path / "missing.gguf", skip={"model.layers.1.mlp.up_proj"})
    with pytest.raises(ValueError, match="has no tensor blk.1.ffn_up.weight"):
        quantize_backbone(tiny_model("llama"), "q4", gguf=tmp_path / "missing.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "neox.gguf"), "gptneox")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'gptneox' GGUF is not supported"):
        quantize_backbone(model, "q4", gguf=tmp_path / "neox.gguf")
    with pytest.raises(ValueError, match="read only for weights='q4'"):
        quantize_backbone(model, "int8", gguf=tmp_path / "neox.gguf")
    with pytest.raises(ValueError, match="groups of 32 input features"):
        quantize_backbone(tiny_model("llama", hidden_size=48, head_dim=12), "q4")

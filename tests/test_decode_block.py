"""decode_block against its pure-torch reference: output and cache writes, a row computed alike
whatever else is in the call, opcheck, torch.compile and errors. (Against HF's own blocks:
test_generation.py.)"""

import pytest
import torch

from eefast.ops import decode_block, quantize_gguf, quantize_rows
from eefast.ops.reference import decode_block as decode_block_reference

D, HD, HEADS, KV_HEADS, INNER = 64, 16, 4, 2, 96


class Block:
    """Random weights of a grouped-query block (4 heads, 2 kv heads) and a cache to run on."""

    def __init__(self, dtype, device, bias=False, seed=0, low_bit=""):
        g = torch.Generator().manual_seed(seed)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

        shapes = [(HEADS * HD, D), (KV_HEADS * HD, D), (KV_HEADS * HD, D), (D, HEADS * HD),
                  (INNER, D), (INNER, D), (D, INNER)]  # fmt: skip
        self.weights = [rand(*s, scale=s[1] ** -0.5) for s in shapes]
        with_bias = {0, 1, 2} if bias else set()  # qwen2's: q, k and v only
        self.biases = [rand(s[0], scale=0.1) if i in with_bias else None
                       for i, s in enumerate(shapes)]  # fmt: skip
        self.norms = (1 + rand(D, scale=0.1), 1 + rand(D, scale=0.1))
        self.rand = rand
        self.scales = None
        if low_bit == "int8":  # weight-only int8, one scale per output row
            pairs = [quantize_rows(w) for w in self.weights]
            self.weights = [q.to(device) for q, _ in pairs]
            self.scales = [s.to(device) for _, s in pairs]
        elif low_bit:  # GGUF blocks
            self.weights = [quantize_gguf(w, low_bit) for w in self.weights]

    def call(self, op, h, cache, cache_len, allowed, positions):
        inv_freq = 1.0 / (10000 ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))
        angles = positions.float()[..., None] * inv_freq.to(positions.device)
        emb = torch.cat([angles, angles], -1)
        k, v = cache
        return op(h, emb.cos().to(h.dtype), emb.sin().to(h.dtype), allowed, k, v, cache_len,
                  self.norms, self.weights, self.biases, 1e-5, HD**-0.5, self.scales)  # fmt: skip


def causal(valid, cache_len, q):
    """allowed [B, q, cache_len + q]: valid keys at or before each query's slot."""
    slots = torch.arange(cache_len + q, device=valid.device)
    mine = torch.arange(cache_len, cache_len + q, device=valid.device)
    return valid[:, None, : cache_len + q] & (slots[None, None] <= mine[None, :, None])


def filled_cache(block, batch, slots, dtype, device):
    return block.rand(batch, KV_HEADS, slots, HD), block.rand(batch, KV_HEADS, slots, HD)


LOW_BIT = ["", "int8", "q4_0", "q4_1", "q8_0"]  # float, int8 rows, GGUF blocks


@pytest.mark.parametrize("low_bit", LOW_BIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q,cache_len", [(1, 9), (3, 5), (12, 0)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(device, dtype, q, cache_len, bias, low_bit):
    if low_bit.startswith("q") and device.type != "cpu":
        pytest.skip("GGUF blocks run on CPU only")
    block = Block(dtype, device, bias, low_bit=low_bit)
    batch = 2
    h = block.rand(batch, q, D)
    valid = torch.rand(batch, cache_len + q, generator=torch.Generator().manual_seed(1)) > 0.3
    valid[:, cache_len:] = True
    valid = valid.to(device)
    allowed = causal(valid, cache_len, q)
    positions = valid.long().cumsum(1)[:, cache_len:] - 1
    got_cache = filled_cache(block, batch, cache_len + q + 4, dtype, device)
    want_cache = tuple(c.clone() for c in got_cache)
    got = block.call(decode_block, h, got_cache, cache_len, allowed, positions)
    want = block.call(decode_block_reference, h, want_cache, cache_len, allowed, positions)
    assert got.dtype == dtype and got.shape == h.shape
    tol = 2e-5 if dtype == torch.float32 else 5e-2
    if low_bit.startswith("q"):  # the kernel rounds activations to int8 steps, and rms_norm's
        tol = 5e-2 if dtype == torch.float32 else 1e-1  # last bit (another order here) can
        # move one of them by a step
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    for g, w in zip(got_cache, want_cache, strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol)


def test_a_query_that_sees_no_key_gets_zero_attention(device):
    block = Block(torch.float32, device)
    h = block.rand(1, 2, D)
    cache = filled_cache(block, 1, 6, torch.float32, device)
    allowed = torch.ones(1, 2, 6, dtype=torch.bool, device=device)
    allowed[0, 1] = False
    got = block.call(decode_block, h, cache, 4, allowed, torch.tensor([[4, 5]], device=device))
    want = block.call(decode_block_reference, h, tuple(c.clone() for c in cache), 4, allowed,
                      torch.tensor([[4, 5]], device=device))  # fmt: skip
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("low_bit", ["", "q4_1"])
def test_a_token_gives_the_same_bits_whatever_else_is_in_the_call(low_bit):
    """Speculative decoding is exact only if a verified token's output equals its output when
    decoded alone: the same bits with drafts after it, other sequences beside it and padding
    slots before it (CPU float32)."""
    block = Block(torch.float32, "cpu", low_bit=low_bit)
    prefix = 7
    cache = filled_cache(block, 1, prefix + 3, torch.float32, "cpu")
    h = block.rand(1, 3, D)
    pos = torch.arange(prefix, prefix + 3)[None]
    valid = torch.ones(1, prefix + 3, dtype=torch.bool)
    # three tokens in one call
    together = tuple(c.clone() for c in cache)
    out3 = block.call(decode_block, h, together, prefix, causal(valid, prefix, 3), pos)
    # one at a time
    alone = tuple(c.clone() for c in cache)
    for t in range(3):
        out1 = block.call(decode_block, h[:, t : t + 1], alone, prefix + t,
                          causal(valid, prefix + t, 1), pos[:, t : t + 1])  # fmt: skip
        assert torch.equal(out1, out3[:, t : t + 1])
    assert torch.equal(alone[0], together[0]) and torch.equal(alone[1], together[1])
    # in a batch of two, left-padded by two hidden slots, beside another sequence
    pad = 2
    other = block.rand(1, 3, D)
    padded = [torch.cat([block.rand(2, KV_HEADS, pad, HD), torch.cat([c, c2])], 2)
              for c, c2 in zip(cache, filled_cache(block, 1, prefix + 3, torch.float32, "cpu"),
                               strict=True)]  # fmt: skip
    valid2 = torch.ones(2, pad + prefix + 3, dtype=torch.bool)
    valid2[0, :pad] = False
    out_b = block.call(decode_block, torch.cat([h, other]), padded, pad + prefix,
                       causal(valid2, pad + prefix, 3), torch.cat([pos, pos]))  # fmt: skip
    assert torch.equal(out_b[:1], out3)


@pytest.mark.parametrize("low_bit", ["", "int8", "q4_1"])
def test_opcheck(device, low_bit):
    if low_bit.startswith("q") and device.type != "cpu":
        pytest.skip("GGUF blocks run on CPU only")
    block = Block(torch.float32, device, bias=True, low_bit=low_bit)
    h = block.rand(2, 3, D)
    cache = filled_cache(block, 2, 8, torch.float32, device)
    allowed = causal(torch.ones(2, 8, dtype=torch.bool, device=device), 5, 3)
    cos, sin = torch.ones(2, 3, HD, device=device), torch.zeros(2, 3, HD, device=device)
    torch.library.opcheck(
        torch.ops.eefast.decode_block.default,
        (h, cos, sin, allowed, *cache, 5, *block.norms, block.weights, block.biases, 1e-5, 0.25,
         block.scales or []),
    )  # fmt: skip


def test_torch_compile_fullgraph(device):
    block = Block(torch.float32, device)
    h = block.rand(1, 2, D)
    allowed = causal(torch.ones(1, 6, dtype=torch.bool, device=device), 4, 2)
    pos = torch.tensor([[4, 5]], device=device)
    cache = filled_cache(block, 1, 6, torch.float32, device)
    want_cache = tuple(c.clone() for c in cache)

    @torch.compile(fullgraph=True)
    def f(h, cache):
        return block.call(decode_block, h, cache, 4, allowed, pos).relu()

    want = block.call(decode_block_reference, h, want_cache, 4, allowed, pos).relu()
    torch.testing.assert_close(f(h, cache), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(cache[0], want_cache[0], atol=2e-5, rtol=2e-5)


def test_bad_input_is_refused():
    block = Block(torch.float32, "cpu")
    h = block.rand(1, 2, D)
    cache = filled_cache(block, 1, 6, torch.float32, "cpu")
    allowed = torch.ones(1, 2, 6, dtype=torch.bool)
    pos = torch.tensor([[4, 5]])
    with pytest.raises(RuntimeError, match=r"allowed must be bool \[1, 2, 6\]"):
        block.call(decode_block, h, cache, 4, allowed[..., :5], pos)
    with pytest.raises(RuntimeError, match=r"k_cache and v_cache must be \[1, 2, >= 7, 16\]"):
        block.call(decode_block, h, cache, 5, torch.ones(1, 2, 7, dtype=torch.bool), pos)
    with pytest.raises(RuntimeError, match="must be Float like h"):
        block.call(decode_block, h, (cache[0].bfloat16(), cache[1]), 4, allowed, pos)
    block.weights[5] = block.weights[5][:, :10]
    with pytest.raises(RuntimeError, match=r"up_proj weight must be \[96, 64\]"):
        block.call(decode_block, h, cache, 4, allowed, pos)


def test_the_portable_kernels_match_the_reference_too():
    """With EEFAST_DISABLE_AVX2=1 the block's attention and linears take the portable code;
    it must compute the same block."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, test_decode_block as t\n"
        "from eefast.ops import decode_block\n"
        "from eefast.ops.reference import decode_block as ref\n"
        "b = t.Block(torch.float32, 'cpu', bias=True)\n"
        "h = b.rand(2, 3, t.D); pos = torch.tensor([[5, 6, 7], [5, 6, 7]])\n"
        "allowed = t.causal(torch.ones(2, 8, dtype=torch.bool), 5, 3)\n"
        "c1 = t.filled_cache(b, 2, 8, torch.float32, 'cpu')\n"
        "c2 = tuple(c.clone() for c in c1)\n"
        "got = b.call(decode_block, h, c1, 5, allowed, pos)\n"
        "want = b.call(ref, h, c2, 5, allowed, pos)\n"
        "torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)\n"
    )
    path = os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "EEFAST_DISABLE_AVX2": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

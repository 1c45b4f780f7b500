"""Early-exit generation on tiny random models: speculative decoding is lossless, threshold
mode's KV recompute is exact, sampling is reproducible, bad input is refused."""

import dataclasses

import pytest
import torch

from eefast.exits import add_exits
from eefast.generation import generate
from eefast.generation.cache import DecodeState, SlotCache
from eefast.generation.decode import prefill
from eefast.generation.runner import Runner
from eefast.hf import left_pad
from tiny_models import tiny_model, token_batch

NEW = 24


class StubTokenizer:
    """Just what generate needs when prompts are token ids: an EOS id and decode."""

    def __init__(self, eos):
        self.eos_token_id = eos
        self.pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def ragged_prompts():
    ids = token_batch(3, 9, seed=3).tolist()
    return [ids[0], ids[1][:4], ids[2][:7]]  # different lengths: left padding


@pytest.fixture(scope="module")
def llama_ee():
    return add_exits(tiny_model("llama"), [1, 2], kind="norm")


def full_greedy(ee, prompts, tokenizer=None):
    return generate(ee, tokenizer, prompts, mode="full", max_new_tokens=NEW).tokens


def test_full_depth_matches_hf_generate(llama_ee):
    for prompt in token_batch(2, 6, seed=5).tolist():
        ids = torch.tensor([prompt])
        want = llama_ee.model.generate(ids, max_new_tokens=NEW, do_sample=False)
        want = want[0, len(prompt) :].tolist()
        assert full_greedy(llama_ee, [prompt])[0] == want
    # decode_linears routed the linears through decode_linear only while generating
    assert not any("forward" in m.__dict__ for m in llama_ee.modules())


@pytest.mark.parametrize("exit_layer", [1, 2])
@pytest.mark.parametrize("k,adaptive", [(1, False), (3, False), (2, True)])
def test_speculative_greedy_is_exact(llama_ee, exit_layer, k, adaptive):
    prompts = ragged_prompts()
    want = full_greedy(llama_ee, prompts)
    for batch in ([p] for p in prompts):  # batch 1, each prompt
        got = generate(
            llama_ee,
            None,
            batch,
            "speculative",
            NEW,
            exit_layer=exit_layer,
            draft_k=k,
            adaptive=adaptive,
            threshold=0.0,
        )
        assert got.tokens[0] == want[prompts.index(batch[0])]
    got = generate(
        llama_ee,
        None,
        prompts,
        "speculative",
        NEW,
        exit_layer=exit_layer,
        draft_k=k,
        adaptive=adaptive,
        threshold=0.0,
    )  # batch 3, ragged
    assert got.tokens == want
    assert got.stats.drafted > 0 and got.stats.tokens == 3 * NEW


@pytest.mark.parametrize("k,adaptive", [(4, True), (2, False)])
def test_speculative_drafting_at_confident_exits_is_exact(llama_ee, k, adaptive):
    """Drafts leave at the first confident exit of several, wait there, and join the round's
    last token on its way up: output is still full greedy, at batch 1 and 3."""
    prompts = ragged_prompts()
    want = full_greedy(llama_ee, prompts)
    kw = dict(exits=[1, 2], threshold=0.015, draft_k=k, adaptive=adaptive)
    got = generate(llama_ee, None, prompts, "speculative", NEW, **kw)
    assert got.tokens == want
    for i, prompt in enumerate(prompts):
        assert generate(llama_ee, None, [prompt], "speculative", NEW, **kw).tokens[0] == want[i]
    layers = {layer for row in got.layers for layer in row}
    assert {1, 2, 4} <= layers, f"want accepted drafts from both exits, got {layers}"
    assert got.stats.rounds < 3 * NEW  # rounds emitted more than one token


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_speculative_exact_on_other_llama_family(arch):
    ee = add_exits(tiny_model(arch), [2], kind="mlp")
    prompts = ragged_prompts()
    got = generate(ee, None, prompts, "speculative", NEW, exit_layer=2, draft_k=3, threshold=0)
    assert got.tokens == full_greedy(ee, prompts)


QWEN2_HALF_SLIDING = ["full_attention"] * 2 + ["sliding_attention"] * 2


@pytest.mark.parametrize(
    "arch,config",
    [
        ("mistral", dict(sliding_window=3)),  # every block
        ("qwen2", dict(use_sliding_window=True, sliding_window=3, layer_types=QWEN2_HALF_SLIDING)),
    ],
)
def test_sliding_window_attention_matches_hf_generate(arch, config):
    """Blocks with a sliding window attend only that many positions back, as in HF; speculative
    decoding stays exact with it."""
    ee = add_exits(tiny_model(arch, **config), [1, 2], kind="norm")
    eos = StubTokenizer(ee.model.config.eos_token_id)  # HF generate stops there too
    full = []
    for prompt in ragged_prompts():
        want = ee.model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)
        full.append(full_greedy(ee, [prompt], eos)[0])
        assert full[-1] == want[0, len(prompt) :].tolist()
        got = generate(ee, eos, [prompt], "speculative", NEW, exits=[1, 2], threshold=0.015)
        assert got.tokens[0] == full[-1] and got.stats.drafted > 0
    no_window = add_exits(tiny_model(arch), [1, 2], kind="norm")
    assert full != [full_greedy(no_window, [p], eos)[0] for p in ragged_prompts()], "no effect"


def test_weight_passes_are_counted(llama_ee):
    """Block and head passes per token are what bench-generate reports as decode cost."""
    prompt = ragged_prompts()[:1]
    full = generate(llama_ee, None, prompt, "full", NEW)
    assert (full.stats.block_calls, full.stats.head_calls) == (4 * (NEW - 1), NEW - 1)
    k, E = 3, 2
    spec = generate(
        llama_ee,
        None,
        prompt,
        "speculative",
        NEW,
        exit_layer=E,
        draft_k=k,
        adaptive=False,
        threshold=0,
    )
    rounds = spec.stats.rounds
    assert spec.stats.block_calls == rounds * ((k + 1) * E + (4 - E))
    assert spec.stats.head_calls == rounds * (k + 1)


def test_speculative_accepts_everything_when_the_exit_is_the_model():
    """A model whose upper blocks are zeroed (identity) has exit == final: every draft is
    accepted, so rounds emit k + 1 tokens."""
    model = tiny_model("llama")
    with torch.no_grad():
        for block in model.model.layers[2:]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    ee = add_exits(model, [2], kind="norm", share_lm_head=True)
    got = generate(
        ee, None, ragged_prompts()[:1], "speculative", NEW, draft_k=3, adaptive=False, threshold=0
    )
    assert got.stats.acceptance == 1.0
    assert got.tokens[0] == full_greedy(ee, ragged_prompts()[:1])[0]


def every_round_drafts(ee, tokenizer, prompts, k, **kw):
    """Exit 2 drafts k tokens every round (threshold 0, fixed k): blocks of k drafts."""
    return generate(
        ee,
        tokenizer,
        prompts,
        "speculative",
        NEW,
        exit_layer=2,
        draft_k=k,
        adaptive=False,
        threshold=0,
        **kw,
    )


def test_eos_inside_an_accepted_block_ends_generation(llama_ee):
    prompts = ragged_prompts()
    plain = full_greedy(llama_ee, prompts)
    eos = plain[0][5]  # a token the first sequence emits mid-way
    tok = StubTokenizer(eos)
    want = generate(llama_ee, tok, prompts, "full", NEW).tokens
    assert want[0] == plain[0][: plain[0].index(eos) + 1]
    for k in (2, 6):
        assert every_round_drafts(llama_ee, tok, prompts, k).tokens == want


def test_stop_string_inside_an_accepted_block_ends_generation(llama_ee):
    prompts = ragged_prompts()
    plain = full_greedy(llama_ee, prompts)[0]
    tok = StubTokenizer(eos=-1)
    stop = f"{plain[4]} {plain[5]}"  # text that appears mid-way through the first sequence
    end = next(n for n in range(1, len(plain) + 1) if stop in tok.decode(plain[:n]))
    want = generate(llama_ee, tok, prompts, "full", NEW, stop=[stop])
    assert want.tokens[0] == plain[:end]
    assert stop not in want.texts[0] and tok.decode(plain[:end]).startswith(want.texts[0])
    for k in (2, 6):
        got = every_round_drafts(llama_ee, tok, prompts, k, stop=[stop, "no such text"])
        assert got.tokens == want.tokens and got.texts == want.texts
    with pytest.raises(ValueError, match="must not be empty"):
        generate(llama_ee, tok, prompts, "full", NEW, stop=[""])
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(llama_ee, None, prompts, "full", NEW, stop=["x"])


@pytest.mark.parametrize("kv", ["recompute", "propagate"])
def test_threshold_above_one_is_full_greedy(llama_ee, kv):
    prompts = ragged_prompts()
    got = generate(llama_ee, None, prompts, "threshold", NEW, threshold=1.01, kv=kv)
    assert got.tokens == full_greedy(llama_ee, prompts)
    assert set(got.stats.exit_layers) == {4}


def test_propagate_kv_is_the_attention_blocks_own_kv_of_the_exited_state(llama_ee):
    """CALM's copy-up: block i's cached K/V for an exited token must be what block i's own
    attention (HF code, its rotary) computes from the exited hidden state."""
    runner = Runner(llama_ee)
    state = DecodeState(runner.num_layers, 2, "cpu")
    ids, valid = left_pad(ragged_prompts()[:2], 0)
    prefill(runner, state, ids, valid)
    state.add_slots(torch.ones(2, 1, dtype=torch.bool))
    h = runner.run(runner.embed(torch.tensor([[7], [9]]), state), 0, 2, state)
    runner.propagate_kv(h, 2, 4, state)
    slot = state.slots - 1
    pos = state.pos[:, slot : slot + 1]
    rotary = runner.base.rotary_emb(h, position_ids=pos)
    for i in (2, 3):
        layer, ref = runner.layers[i], SlotCache(runner.num_layers)
        layer.self_attn(layer.input_layernorm(h), rotary, None, past_key_values=ref)
        torch.testing.assert_close(state.cache.keys[i][:, :, slot], ref.keys[i][:, :, 0])
        torch.testing.assert_close(state.cache.values[i][:, :, slot], ref.values[i][:, :, 0])
        assert state.cache.lengths[i] == state.slots


def test_propagate_mixes_exits_and_emits_every_token(llama_ee):
    prompts = ragged_prompts()
    got = generate(llama_ee, None, prompts, "threshold", NEW, threshold=0.015, kv="propagate")
    layers = [layer for row in got.layers for layer in row]
    assert min(layers) < 4 and layers.count(4) > 3, "want a mix of exits and full depth"
    assert [len(t) for t in got.tokens] == [NEW] * len(prompts)


@pytest.mark.parametrize(
    "mode,kw",
    [
        ("threshold", dict(threshold=0.015)),  # runs of exits at one layer wait together
        ("speculative", dict(exit_layer=2, threshold=0.0)),
        ("speculative", dict(exits=[1, 2], threshold=0.015)),
    ],
)
def test_cached_kv_is_the_full_forwards(llama_ee, finished_caches, mode, kw):
    """Every layer's cached keys and values, over the valid slots, are what one full forward
    over the prompt and the emitted tokens computes: tokens that waited at an exit joined the
    climb in slot order, and rejected drafts are hidden."""
    exited = 0
    for prompt in ragged_prompts():
        got = generate(llama_ee, None, [prompt], mode, NEW, **kw)
        exited += sum(layer < 4 for layer in got.layers[0])
        valid, lengths, keys, values = finished_caches[-1]
        ids = torch.tensor([prompt + got.tokens[0][:-1]])  # the last token was never fed
        ref = llama_ee.model(ids, use_cache=True).past_key_values
        for i, n in enumerate(lengths):
            slots = valid[:n].nonzero().squeeze(1)[: ids.shape[1]]  # a budget cut may leave
            if i == 0:  # accepted drafts past the last kept token
                assert len(slots) == ids.shape[1], "layer 0 holds every fed token"
            for mine, want in ((keys[i], ref.layers[i].keys), (values[i], ref.layers[i].values)):
                mine = mine[0][:, slots]
                torch.testing.assert_close(mine, want[0, :, : len(slots)], atol=1e-4, rtol=0)
    assert exited > 0, "want some tokens from an exit"


@pytest.mark.parametrize("measure,threshold", [("max_prob", 0.015), ("margin", 0.002)])
def test_threshold_recompute_gives_full_forward_logits(llama_ee, measure, threshold):
    """Tokens that exited early leave their KV to be recomputed; every token decided at full
    depth afterwards must be what a full forward over the same tokens predicts."""
    prompts = ragged_prompts()
    got = generate(llama_ee, None, prompts, "threshold", NEW, threshold=threshold, measure=measure)
    layers = [layer for row in got.layers for layer in row]
    assert min(layers) < 4 and layers.count(4) > 3, "want a mix of exits and full depth"
    for prompt, toks, lays in zip(prompts, got.tokens, got.layers, strict=True):
        logits = llama_ee.model(torch.tensor([prompt + toks])).logits[0]
        want = logits[len(prompt) - 1 : -1].argmax(-1)
        for j, (t, layer) in enumerate(zip(toks, lays, strict=True)):
            if layer == 4:
                assert t == int(want[j]), f"token {j} decided at full depth"


def test_sampling_is_reproducible_and_seeded(llama_ee):
    prompts = ragged_prompts()
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, exit_layer=2, draft_k=3, threshold=0)
    a = generate(llama_ee, None, prompts, "speculative", NEW, seed=7, **kw).tokens
    b = generate(llama_ee, None, prompts, "speculative", NEW, seed=7, **kw).tokens
    c = generate(llama_ee, None, prompts, "speculative", NEW, seed=8, **kw).tokens
    assert a == b and a != c
    kw.update(exit_layer=None, exits=[1, 2], threshold=0.01)  # drafts from either exit
    a = generate(llama_ee, None, prompts, "speculative", NEW, seed=7, **kw)
    assert a.tokens == generate(llama_ee, None, prompts, "speculative", NEW, seed=7, **kw).tokens
    assert a.stats.drafted > 0
    full = generate(llama_ee, None, prompts, "full", NEW, seed=7, temperature=0.9).tokens
    assert full == generate(llama_ee, None, prompts, "full", NEW, seed=7, temperature=0.9).tokens


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(mode="speculative", exit_layer=3), r"no exit at layer 3; .* exits at \[1, 2\]"),
        (dict(mode="speculative", draft_k=0), "draft_k must be > 0"),
        (dict(mode="speculative", draft_k=-2), "draft_k must be > 0"),
        (dict(mode="sideways"), "unknown mode"),
        (dict(mode="threshold", measure="vibes"), "unknown measure"),
        (dict(mode="threshold", min_exit=3), "no exit at or above min_exit"),
        (dict(mode="threshold", temperature=0.5), "threshold mode is greedy"),
        (dict(mode="speculative", temperature=0.5, measure="margin"), "use measure='max_prob'"),
        (dict(mode="speculative", exits=[1, 5]), r"no exit at layer 5"),
        (dict(mode="threshold", kv="lazy"), "unknown kv mode"),
        (dict(mode="full", max_new_tokens=0), "max_new_tokens must be > 0"),
    ],
)
def test_bad_arguments(llama_ee, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(llama_ee, None, [[5, 6, 7]], **kwargs)


def test_bad_models_and_prompts(llama_ee, monkeypatch):
    with pytest.raises(ValueError, match="no exits attached"):
        generate(tiny_model("llama"), None, [[5, 6]])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(llama_ee, None, [[5, 6], []])
    with pytest.raises(ValueError, match="no prompts"):
        generate(llama_ee, None, [])
    # An architecture the table gives no decode calls is refused by name.
    gpt2 = add_exits(tiny_model("gpt2"), [1])
    monkeypatch.setattr(gpt2.parts, "spec", dataclasses.replace(gpt2.parts.spec, decode=None))
    with pytest.raises(ValueError, match="'gpt2' models are not supported"):
        generate(gpt2, None, [[5, 6]])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_lean_blocks_are_bit_identical_to_the_modules(arch, impl):
    """lean_block skips module dispatch only: prefill and a 3-token step give the same bits."""
    model = tiny_model(arch)
    model.set_attn_implementation(impl)
    ee = add_exits(model, [2], kind="norm")
    runner = Runner(ee)
    attention = runner.lean
    assert all(fn is not None for fn in attention)
    tokens, valid = left_pad(ragged_prompts(), 0)
    outs = []
    for lean in (True, False):
        runner.lean = attention if lean else [None] * runner.num_layers
        state = DecodeState(runner.num_layers, len(tokens), "cpu")
        with runner.decode_linears(), torch.no_grad():
            first = prefill(runner, state, tokens, valid)
            state.add_slots(torch.ones(len(tokens), 3, dtype=torch.bool))
            step = runner.run(
                runner.embed(tokens[:, :3], state), 0, runner.num_layers, state, False
            )
        outs.append((first, step, state.cache.keys[3][:, :, : state.slots]))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_fused_blocks_match_the_modules(arch):
    """A decode step through decode_block gives the modules' hidden states and cached keys
    and values (to float32 rounding: the op sums in its own order)."""
    ee = add_exits(tiny_model(arch), [2], kind="norm")
    runner = Runner(ee)
    assert all(block is not None for block in runner.fused)
    tokens, valid = left_pad(ragged_prompts(), 0)
    outs = []
    for fused in (True, False):
        state = DecodeState(runner.num_layers, len(tokens), "cpu")
        with runner.decode_linears(), torch.no_grad():
            prefill(runner, state, tokens, valid)
            state.add_slots(torch.tensor([[True, False, True]] * len(tokens)))  # with a hole
            step = runner.run(
                runner.embed(tokens[:, :3], state), 0, runner.num_layers, state, fused
            )
        cache = state.cache
        outs.append((step, *(c[i][:, :, : state.slots] for c in (cache.keys, cache.values)
                             for i in range(runner.num_layers))))  # fmt: skip
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_blocks_with_hooks_run_through_their_modules():
    ee = add_exits(tiny_model("llama"), [2], kind="norm")
    ee.model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: o * 2)
    runner = Runner(ee)
    assert [fn is not None for fn in runner.lean] == [True, False, True, True]
    assert [block is not None for block in runner.fused] == [True, False, True, True]


def test_bench_generate_times_another_provider_beside_eefast(tmp_path, monkeypatch):
    """A llama.cpp provider (``--gguf``) is one more case at batch 1, fed each prompt's ids
    and compared with HF greedy and full depth like the others; the q4 copy's speculative row
    is there at every batch size, lossless."""
    from eefast.eval import bench_generate

    class Provider:  # llama.cpp's interface: a name and greedy(ids, max_new, eos)
        name = "llama.cpp stub.gguf"
        calls = []

        def __init__(self, gguf, threads):
            pass

        def greedy(self, ids, max_new, eos=None):
            self.calls.append(list(ids))
            return full[prompts.index(list(ids))][:max_new], 0.5

    monkeypatch.setattr(bench_generate, "LlamaCpp", Provider)
    model = tiny_model("llama", initializer_range=0.2)
    ee = add_exits(model, [2], kind="norm")
    tok = StubTokenizer(model.config.eos_token_id)
    prompts = ragged_prompts()[:2]
    full = generate(ee, tok, prompts, "full", 5, chat=False).tokens
    rows = bench_generate.run_bench(
        ee, tok, batch_sizes=[1, 2], prompts=prompts, max_new_tokens=5, thresholds=[],
        draft_thresholds=[], variant_thresholds=[], kv_variants=[], threads=1,
        out=tmp_path, ggufs=["stub.gguf"], report=lambda _: None,
    )  # fmt: skip
    stub = [r for r in rows if r["provider"] == Provider.name]
    assert [r["batch"] for r in stub] == [1]  # batch 1 only
    # an untimed warm-up on the first batch (one prompt at batch 1), then the timed run
    assert Provider.calls == [prompts[0], *prompts] and stub[0]["same_as_full"]
    assert stub[0]["tokens_per_s"] == sum(len(t) for t in full) / 1.0
    q4 = [r for r in rows if r["provider"] == "eefast speculative q4 draft"]
    assert [r["batch"] for r in q4] == [1, 2]
    assert all(r["same_as_full"] and r["acceptance"] > 0 for r in q4)

"""Generation on every supported architecture, with norm, mlp and layer exits: every mode's
greedy output is HF generate's, at batch 1 and 3 (left padding), and every cache layer,
including a layer exit's own, stays exact under drafting, rollback and recompute."""

import pytest
import torch

from eefast.exits import add_exits
from eefast.generation import generate
from eefast.generation.cache import DecodeState
from eefast.generation.decode import prefill
from eefast.generation.runner import Runner
from eefast.hf import left_pad
from test_generation import StubTokenizer, ragged_prompts
from tiny_models import ARCH_NAMES, tiny_model

NEW = 16
KINDS = ["norm", "mlp", "layer"]


def exits_for(arch: str, kind: str):
    return add_exits(tiny_model(arch), [1, 2], kind=kind)


def hf_greedy(ee, prompt, eos):
    out = ee.model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                            pad_token_id=0, eos_token_id=eos)  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_mode_is_hf_greedy(arch, kind):
    ee = exits_for(arch, kind)
    tok = StubTokenizer(ee.model.config.eos_token_id)
    prompts = ragged_prompts()
    want = [hf_greedy(ee, p, tok.eos_token_id) for p in prompts]
    assert any(len(w) == NEW for w in want), "want some sequences that run to the budget"
    cases = {
        "full": dict(mode="full"),
        "speculative, a fixed exit": dict(
            mode="speculative", exit_layer=2, threshold=0.0, draft_k=3, adaptive=False
        ),  # fmt: skip
        "speculative, confident exits": dict(mode="speculative", exits=[1, 2], threshold=0.015),
        "threshold above 1": dict(mode="threshold", threshold=1.5),
    }
    drafted = 0
    for name, kw in cases.items():
        got = generate(ee, tok, prompts, max_new_tokens=NEW, **kw)  # batch 3, left-padded
        assert got.tokens == want, name
        for prompt, w in zip(prompts, want, strict=True):  # batch 1
            assert generate(ee, tok, [prompt], max_new_tokens=NEW, **kw).tokens[0] == w, name
        drafted += got.stats.drafted
    assert drafted > 0


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_layer_exits_compute_what_they_trained_on(arch):
    """A layer exit's block, run in decoding on its own cache layer, gives the pre-head state
    that training computes (the block over the whole sequence at once)."""
    ee = exits_for(arch, "layer")
    runner = Runner(ee)
    ids = torch.tensor([ragged_prompts()[0]])
    tokens, valid = left_pad(ids.tolist(), 0, "cpu")
    state = DecodeState(runner.cache_layers, 1, "cpu")
    with torch.no_grad(), runner.decode_linears():
        prefill(runner, state, tokens, valid)
        states = ee.backbone_states(ids)
        for layer in ee.exit_layers:
            mine = ee.exit(layer).norm(runner._exit_out[layer])
            torch.testing.assert_close(mine, ee.exit_hidden(layer, states), atol=1e-4, rtol=0)
    assert runner.cache_layers == ee.num_layers + 2


@pytest.mark.parametrize(
    "mode,kw",
    [
        ("threshold", dict(threshold=0.015)),  # exited tokens wait, then join in slot order
        ("speculative", dict(exit_layer=2, threshold=0.0)),
        ("speculative", dict(exits=[1, 2], threshold=0.015)),
    ],
)
@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox", "bloom", "gptj", "llama"])
def test_every_cache_layer_is_one_pass_over_the_tokens(arch, mode, kw, monkeypatch):
    """After decoding, every cache layer (the model's blocks and each layer exit's) holds, at
    its valid slots, what one prefill over the prompt and the emitted tokens writes there."""
    ee = exits_for(arch, "layer")
    snapshots = []
    real_select = DecodeState.select

    def select(self, rows):  # the sequence finished: keep its cache before it is dropped
        cache = self.cache
        snapshots.append((self.valid[0], list(cache.lengths), cache.keys[:], cache.values[:]))
        real_select(self, rows)

    monkeypatch.setattr(DecodeState, "select", select)
    exited = 0
    for prompt in ragged_prompts():
        got = generate(ee, None, [prompt], mode, NEW, **kw)
        exited += sum(layer < ee.num_layers for layer in got.layers[0])
        valid, lengths, keys, values = snapshots[-1]
        seq = prompt + got.tokens[0][:-1]  # the last token was never fed
        runner = Runner(ee)
        ref = DecodeState(runner.cache_layers, 1, "cpu")
        with torch.no_grad(), runner.decode_linears():
            prefill(runner, ref, *left_pad([seq], 0, "cpu"))
        for i, n in enumerate(lengths):
            # Tokens that exited last may still wait below a layer; a budget cut may leave
            # accepted drafts past the last kept token.
            slots = valid[:n].nonzero().squeeze(1)[: len(seq)]
            if i == 0:
                assert len(slots) == len(seq), "layer 0 holds every fed token"
            for mine, want in ((keys[i], ref.cache.keys[i]), (values[i], ref.cache.values[i])):
                torch.testing.assert_close(mine[0][:, slots], want[0][:, : len(slots)],
                                           atol=1e-4, rtol=0, msg=f"cache layer {i}")  # fmt: skip
    assert exited > 0, "want some tokens from an exit"


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_propagate_is_refused_where_it_cannot_run(arch):
    ee = exits_for(arch, "norm")
    with pytest.raises(ValueError, match="kv='propagate' runs on llama-family"):
        generate(ee, None, [ragged_prompts()[0]], "threshold", 4, kv="propagate")
    llama_layer = exits_for("llama", "layer")
    with pytest.raises(ValueError, match="without 'layer' exits"):
        generate(llama_layer, None, [ragged_prompts()[0]], "threshold", 4, kv="propagate")

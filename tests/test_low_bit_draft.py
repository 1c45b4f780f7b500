"""Speculative decoding drafted by the backbone's own low-bit copy (``draft="q4"``/``"int8"``)
on tiny random models: greedy output equals full depth at batch 1 and 3 on all eight
architectures (EOS and stop strings inside accepted blocks included), every cached K/V is the
full forward's (the drafts' own were rolled back), sampled output follows the full model's
distribution, and what it cannot do is refused clearly."""

import copy

import pytest
import torch

from eefast.exits import add_exits
from eefast.generation import generate, low_bit_draft
from eefast.generation.blocks import FusedBlock
from eefast.hf.quantize import quantize_backbone
from test_feature_draft import (
    assert_eos_and_stop_inside_accepted_blocks,
    assert_sampled_tokens_follow_the_full_model,
)
from test_generation import NEW, ragged_prompts
from tiny_models import ARCH_NAMES, tiny_model

WEIGHTS = ["q4", "int8"]


@pytest.fixture(scope="module")
def ee():
    return add_exits(tiny_model("llama"), [2], kind="norm")


def full_greedy(ee, prompts, tokenizer=None, **kw):
    return generate(ee, tokenizer, prompts, "full", NEW, **kw)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("k,adaptive,threshold", [(1, False, 0.0), (3, False, 0.0),
                                                  (6, True, 0.0), (4, True, 0.3)])  # fmt: skip
def test_greedy_is_exact_at_batch_1_and_3(ee, weights, k, adaptive, threshold):
    prompts = ragged_prompts()
    want = full_greedy(ee, prompts).tokens
    kw = dict(draft=low_bit_draft(ee, weights), draft_k=k, adaptive=adaptive, threshold=threshold)
    for i, p in enumerate(prompts):
        assert generate(ee, None, [p], "speculative", NEW, **kw).tokens[0] == want[i]
    got = generate(ee, None, prompts, "speculative", NEW, **kw)
    assert got.tokens == want
    assert got.stats.accepted > 0 and got.stats.mean_accepted > 1.0


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("arch", [a for a in ARCH_NAMES if a != "llama"])
def test_exact_on_every_other_architecture(arch, weights):
    """The llama family drafts through decode_block, the others through their own block
    modules with low-bit linears."""
    ee = add_exits(tiny_model(arch), [2], kind="norm")
    draft = low_bit_draft(ee, weights)
    fused = [isinstance(b, FusedBlock) for b in draft.blocks]
    assert fused == [arch in ("mistral", "qwen2")] * 4
    prompts = ragged_prompts()
    want = full_greedy(ee, prompts).tokens
    for p, tokens in zip(prompts, want, strict=True):
        assert generate(ee, None, [p], "speculative", NEW, draft=draft).tokens[0] == tokens
    got = generate(ee, None, prompts, "speculative", NEW, draft=draft)
    assert got.tokens == want and got.stats.accepted > 0


def test_a_per_row_int8_copy_drafts_where_widths_are_not_in_groups_of_32():
    ee = add_exits(tiny_model("llama", hidden_size=48), [2], kind="norm")
    draft = low_bit_draft(ee, "int8")
    assert all(b.scales is not None for b in draft.blocks) and draft.head[1] is not None
    prompts = ragged_prompts()
    got = generate(ee, None, prompts, "speculative", NEW, draft=draft)
    assert got.tokens == full_greedy(ee, prompts).tokens and got.stats.accepted > 0


def test_a_draft_exit_model_drafts_from_the_low_bit_copy():
    ee = add_exits(tiny_model("llama"), [4], kind="draft")
    prompts = ragged_prompts()
    got = generate(ee, None, prompts, "speculative", NEW, draft="int8")
    assert got.tokens == full_greedy(ee, prompts).tokens and got.stats.accepted > 0


def test_eos_and_stop_strings_inside_accepted_blocks(ee):
    assert_eos_and_stop_inside_accepted_blocks(ee, draft="int8")


@pytest.mark.parametrize("weights", WEIGHTS)
def test_cached_kv_is_the_full_forwards(ee, weights, finished_caches):
    """After a run, every block's cached K/V over the valid slots is one full forward's: the
    drafts' approximate keys and values were rolled back and the verifier's written."""
    for prompt in ragged_prompts():
        got = generate(ee, None, [prompt], "speculative", NEW, draft=weights, draft_k=5,
                       threshold=0)  # fmt: skip
        assert got.stats.accepted > 0
        valid, lengths, keys, values = finished_caches[-1]
        ids = torch.tensor([prompt + got.tokens[0][:-1]])  # the last token was never fed
        ref = ee.model(ids, use_cache=True).past_key_values
        for i, n in enumerate(lengths):
            # The last round's slots may hold accepted drafts past the token budget.
            slots = valid[:n].nonzero().squeeze(1)[: ids.shape[1]]
            assert len(slots) == ids.shape[1], f"layer {i} misses fed tokens"
            for mine, want in ((keys[i], ref.layers[i].keys), (values[i], ref.layers[i].values)):
                torch.testing.assert_close(mine[0][:, slots], want[0], atol=1e-4, rtol=0)


def test_sampling_is_reproducible_and_seeded(ee):
    prompts = ragged_prompts()
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, draft_k=3, draft="q4")
    a = generate(ee, None, prompts, "speculative", NEW, seed=7, **kw)
    b = generate(ee, None, prompts, "speculative", NEW, seed=7, **kw)
    c = generate(ee, None, prompts, "speculative", NEW, seed=8, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens and a.stats.accepted > 0


def test_sampled_tokens_follow_the_full_models_distribution(ee):
    """The second token, drafted by the q4 copy, then accepted or resampled."""
    assert_sampled_tokens_follow_the_full_model(ee, 0.5, 0.3, draft="q4")


@pytest.mark.parametrize("weights", WEIGHTS)
def test_the_draft_is_the_low_bit_backbone_and_leaves_the_model_alone(ee, weights):
    before = {k: v.clone() for k, v in ee.model.state_dict().items()}
    draft = low_bit_draft(ee, weights)
    assert all(torch.equal(v, before[k]) for k, v in ee.model.state_dict().items())
    low_bit = quantize_backbone(copy.deepcopy(ee.model), weights)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    for block, layer in zip(draft.blocks, low_bit.model.layers, strict=True):
        linears = [layer.get_submodule(n) for n in names]
        assert all(torch.equal(w, m.qweight) for w, m in zip(block.weights, linears, strict=True))
        assert (block.scales is None) == all(m.scales is None for m in linears)
        if block.scales is not None:
            assert all(torch.equal(s, m.scales) for s, m in zip(block.scales, linears, strict=True))
    assert torch.equal(draft.head[0], low_bit.lm_head.qweight)


def test_what_a_low_bit_draft_cannot_do_is_refused(ee):
    with pytest.raises(ValueError, match="drafts for speculative mode only"):
        generate(ee, None, [[5, 6]], "full", 4, draft="q4")
    with pytest.raises(ValueError, match="draft must be one of"):
        generate(ee, None, [[5, 6]], "speculative", 4, draft="q2")
    with pytest.raises(ValueError, match="weights must be one of"):
        low_bit_draft(ee, "fp16")
    with pytest.raises(ValueError, match="a low-bit draft drafts from the whole backbone"):
        generate(ee, None, [[5, 6]], "speculative", 4, draft="q4", exit_layer=2)
    hooked = add_exits(tiny_model("llama"), [2], kind="norm")
    hooked.model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(ValueError, match="block 1 has hooks"):
        low_bit_draft(hooked, "int8")
    odd = add_exits(tiny_model("llama", hidden_size=48, num_attention_heads=4), [2], kind="norm")
    with pytest.raises(ValueError, match="groups of 32"):
        low_bit_draft(odd, "q4")
    layer = add_exits(tiny_model("llama"), [2], kind="layer")
    with pytest.raises(ValueError, match="'layer' exits"):
        generate(layer, None, [[5, 6]], "speculative", 4, draft="q4")
    low_bit = add_exits(quantize_backbone(tiny_model("llama"), "int8"), [2], kind="norm")
    with pytest.raises(ValueError, match="must be float32"):
        low_bit_draft(low_bit, "q4")
    bf16 = add_exits(tiny_model("llama").to(torch.bfloat16), [2], kind="norm")
    with pytest.raises(ValueError, match="must be float32, not torch.bfloat16"):
        low_bit_draft(bf16, "int8")

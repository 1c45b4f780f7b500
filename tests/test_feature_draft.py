"""Draft exits (EAGLE-style top-feature drafting) on tiny random models: they train with the
backbone frozen, speculative decoding with them is lossless at batch 1 and 3 (EOS and stop
strings inside accepted blocks included), every cached K/V is the full forward's, and sampled
output follows the full model's distribution."""

import copy

import pytest
import torch

from eefast.eval import evaluate_exits
from eefast.exits import add_exits, load_exits, save_exits
from eefast.generation import api, generate
from eefast.hf.quantize import quantize_block
from eefast.train import TuneConfig, ee_tune
from test_generation import NEW, StubTokenizer, ragged_prompts
from tiny_models import VOCAB, tiny_model

TOP = 4  # the tiny models' number of blocks
SAMPLED_PROMPT = [5, 17, 42]


SEQ = 40


def greedy_blocks(model):
    """[4, SEQ] blocks: the model's own greedy continuations of the test prompts. A random
    tiny model's next token is a hash of its context that no draft can generalise, so the
    draft learns these by heart, which is what exercising multi-token accepted blocks needs."""
    rows = []
    for prompt in [*ragged_prompts(), SAMPLED_PROMPT]:
        with torch.no_grad():
            n = SEQ - len(prompt)
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)  # fmt: skip
        rows.append(out[0])
    return torch.stack(rows)


def tuned_draft(arch="llama", steps=100):
    model = tiny_model(arch)
    ee = add_exits(model, [TOP], kind="draft")
    data = greedy_blocks(model)
    cfg = TuneConfig(steps=steps, batch_size=4, lr=1e-2, eval_every=steps, lr_warmup_steps=5)
    ee_tune(ee, data, None, cfg, progress=False)
    return ee


@pytest.fixture(scope="module")
def draft_ee():
    return tuned_draft()


def full_greedy(ee, prompts, tokenizer=None, **kw):
    return generate(ee, tokenizer, prompts, "full", NEW, **kw)


def test_a_draft_exit_sits_on_top_of_the_model():
    with pytest.raises(ValueError, match="sits on top of the last block; give layer 4"):
        add_exits(tiny_model("llama"), [2], kind="draft")
    ee = add_exits(tiny_model("llama"), [TOP], kind="draft")
    with pytest.raises(ValueError, match="only drafts for speculative mode"):
        generate(ee, None, [[5, 6]], "threshold", 4)
    with pytest.raises(ValueError, match="a draft exit has one head"):
        generate(ee, None, [[5, 6]], "speculative", 4, exit_layer=TOP)


def test_tuning_teaches_the_draft_what_the_model_says():
    model = tiny_model("llama")
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    ee = add_exits(model, [TOP], kind="draft")
    data = greedy_blocks(model)
    before = evaluate_exits(ee, data, progress=False)[0]["agreement"]
    tuned = tuned_draft()
    after = evaluate_exits(tuned, data, progress=False)[0]["agreement"]
    assert after > max(0.8, before + 0.3), (before, after)
    assert all(torch.equal(v, backbone[k]) for k, v in tuned.model.state_dict().items())


def test_hidden_cache_gives_the_same_training(tmp_path):
    data = greedy_blocks(tiny_model("llama"))
    results = []
    for cache in (False, True, True):  # the third run reads the cache file the second wrote
        ee = add_exits(tiny_model("llama"), [TOP], kind="draft")
        cfg = TuneConfig(steps=6, batch_size=4, lr=3e-3, kd_weight=0.5, cache_hidden=cache,
                         cache_path=str(tmp_path / "cache.safetensors"))  # fmt: skip
        ee_tune(ee, data, None, cfg, progress=False)
        results.append({k: v.clone() for k, v in ee.exits.state_dict().items()})
    for other in results[1:]:
        for k, v in results[0].items():
            torch.testing.assert_close(other[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,adaptive,threshold", [(1, False, 0.0), (3, False, 0.0),
                                                  (6, True, 0.0), (4, True, 0.3)])  # fmt: skip
def test_greedy_is_exact_at_batch_1_and_3(draft_ee, k, adaptive, threshold):
    prompts = ragged_prompts()
    want = full_greedy(draft_ee, prompts).tokens
    kw = dict(draft_k=k, adaptive=adaptive, threshold=threshold)
    for i, p in enumerate(prompts):
        assert generate(draft_ee, None, [p], "speculative", NEW, **kw).tokens[0] == want[i]
    got = generate(draft_ee, None, prompts, "speculative", NEW, **kw)
    assert got.tokens == want
    assert got.stats.accepted > 0 and got.stats.mean_accepted > 1.0


def test_full_depth_with_a_draft_exit_matches_hf_generate(draft_ee):
    prompt = ragged_prompts()[0]
    want = draft_ee.model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)
    assert full_greedy(draft_ee, [prompt]).tokens[0] == want[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_exact_on_other_llama_family(arch):
    ee = tuned_draft(arch, steps=20)
    prompts = ragged_prompts()
    assert generate(ee, None, prompts, "speculative", NEW).tokens == full_greedy(ee, prompts).tokens


def assert_eos_and_stop_inside_accepted_blocks(ee, **draft_kw):
    """Speculative output (blocks of up to 6 accepted drafts, drafted as ``draft_kw`` says)
    ends at an EOS or a stop string inside an accepted block exactly where full depth does."""

    def accepted_blocks(tokenizer, **kw):
        return generate(ee, tokenizer, prompts, "speculative", NEW, draft_k=6, adaptive=False,
                        threshold=0, **draft_kw, **kw)  # fmt: skip

    prompts = ragged_prompts()
    plain = full_greedy(ee, prompts).tokens
    spec = accepted_blocks(None)
    assert spec.tokens == plain and spec.stats.mean_accepted > 2, "want multi-token blocks"
    eos = plain[0][5]  # a token the first sequence emits mid-way
    tok = StubTokenizer(eos)
    want = full_greedy(ee, prompts, tok).tokens
    assert want[0] == plain[0][: plain[0].index(eos) + 1]
    assert accepted_blocks(tok).tokens == want
    tok = StubTokenizer(eos=-1)
    stop = f"{plain[1][4]} {plain[1][5]}"
    want = full_greedy(ee, prompts, tok, stop=[stop])
    got = accepted_blocks(tok, stop=[stop])
    assert got.tokens == want.tokens and got.texts == want.texts
    assert len(want.tokens[1]) < NEW


def test_eos_and_stop_strings_inside_accepted_blocks(draft_ee):
    assert_eos_and_stop_inside_accepted_blocks(draft_ee)


@pytest.fixture(scope="module")
def untuned_ee():
    """An untuned draft exit: its first guess is often wrong and its second often right, so
    a draft tree's other candidates get accepted."""
    return add_exits(tiny_model("llama"), [TOP], kind="draft")


@pytest.fixture
def every_candidate(monkeypatch):
    """Draft trees take every candidate, however unlikely."""
    monkeypatch.setattr(api, "FEATURE_DRAFT_CANDIDATE_MIN", 0.0)


@pytest.mark.parametrize("width,k", [(2, 1), (4, 3), (16, 2)])
def test_draft_trees_are_exact_and_accept_other_candidates(untuned_ee, every_candidate, width,
                                                           k):  # fmt: skip
    prompts = ragged_prompts()
    want = full_greedy(untuned_ee, prompts).tokens
    kw = dict(draft_k=k, draft_width=width, adaptive=False, threshold=0)
    for i, p in enumerate(prompts):
        assert generate(untuned_ee, None, [p], "speculative", NEW, **kw).tokens[0] == want[i]
    got = generate(untuned_ee, None, prompts, "speculative", NEW, **kw)
    assert got.tokens == want
    assert got.stats.candidates_accepted > 0
    chain = generate(untuned_ee, None, prompts, "speculative", NEW, **dict(kw, draft_width=1))
    assert got.stats.accepted > chain.stats.accepted  # the tree's extra candidates pay
    assert got.stats.verify_rows > chain.stats.verify_rows


def test_draft_tree_arguments_are_checked(draft_ee):
    with pytest.raises(ValueError, match="draft trees are greedy"):
        generate(draft_ee, None, [[5, 6]], "speculative", 4, draft_width=3, temperature=0.8)
    with pytest.raises(ValueError, match="draft_width must be >= 1"):
        generate(draft_ee, None, [[5, 6]], "speculative", 4, draft_width=0)
    norm = add_exits(tiny_model("llama"), [2], kind="norm")
    with pytest.raises(ValueError, match="needs a draft exit"):
        generate(norm, None, [[5, 6]], "speculative", 4, draft_width=3)


@pytest.mark.parametrize("tree", [False, True])
def test_cached_kv_is_the_full_forwards(draft_ee, untuned_ee, every_candidate, finished_caches,
                                        tree):  # fmt: skip
    """After a speculative run, every block's cached K/V over the valid slots is one full
    forward's, and the draft layer's is the draft exit's over the real top features (the
    slots it filled from its own predictions were recomputed; those of the last round are
    still owed). With a draft tree, accepted candidates' K/V moved to their chain slot."""
    ee = untuned_ee if tree else draft_ee
    candidates = 0
    for prompt in ragged_prompts():
        got = generate(ee, None, [prompt], "speculative", NEW, draft_k=5, threshold=0,
                       draft_width=8 if tree else 1)  # fmt: skip
        assert got.stats.accepted > 0
        candidates += got.stats.candidates_accepted
        valid, lengths, keys, values = finished_caches[-1]
        ids = torch.tensor([prompt + got.tokens[0][:-1]])  # the last token was never fed
        ref = ee.model(ids, use_cache=True).past_key_values
        states = ee.backbone_states(ids)
        draft_kv = _draft_layer_kv(ee, states)
        for i, n in enumerate(lengths):
            slots = valid[:n].nonzero().squeeze(1)[: ids.shape[1]]
            want_k, want_v = (ref.layers[i].keys, ref.layers[i].values) if i < TOP else draft_kv
            # The draft layer owes the last round's drafts (recomputed when a round follows).
            owed = 6 if i == TOP else 0
            assert len(slots) >= ids.shape[1] - owed, f"layer {i} misses fed tokens"
            for mine, want in ((keys[i], want_k), (values[i], want_v)):
                torch.testing.assert_close(
                    mine[0][:, slots], want[0, :, : len(slots)], atol=1e-4, rtol=0
                )
    assert (candidates > 0) == tree


def _draft_layer_kv(ee, states):
    """The draft block's keys and values over a whole sequence, from the real features. The
    draft layer decodes on its Q8_0 copy (the tiny models' widths are multiples of 32), so the
    reference runs the block module with the same Q8_0 linears."""
    from eefast.generation.cache import SlotCache
    from eefast.generation.runner import _draft_exit_q8

    block = ee.exit(TOP).block
    assert _draft_exit_q8(ee, ee.exit(TOP), None) is not None
    q8 = quantize_block(copy.deepcopy(block.block), "q8_0", "draft")
    cache = SlotCache(TOP + 1)
    x = block.fc(ee.draft_inputs(states))
    kwargs = dict(states.block_kwargs, use_cache=True, past_key_values=cache)
    q8(x, *states.block_args, **kwargs)
    return cache.keys[TOP][:, :, : x.shape[1]], cache.values[TOP][:, :, : x.shape[1]]


def test_sampling_is_reproducible_and_seeded(draft_ee):
    prompts = ragged_prompts()
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, draft_k=3)
    a = generate(draft_ee, None, prompts, "speculative", NEW, seed=7, **kw)
    b = generate(draft_ee, None, prompts, "speculative", NEW, seed=7, **kw)
    c = generate(draft_ee, None, prompts, "speculative", NEW, seed=8, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens and a.stats.accepted > 0


def assert_sampled_tokens_follow_the_full_model(ee, temp, accepted_share, **draft_kw):
    """The second new token (drafted, then accepted or resampled) of 3,000 sampled sequences
    is distributed as the full model's marginal: sum over t1 of p(t1) p(t2 | t1); at least
    ``accepted_share`` of them must have been accepted drafts."""
    prompt, n = SAMPLED_PROMPT, 3000
    with torch.no_grad():
        p1 = (ee.model(torch.tensor([prompt])).logits[0, -1] / temp).softmax(-1)
        pairs = torch.tensor([prompt + [t] for t in range(VOCAB)])
        p2 = (ee.model(pairs).logits[:, -1] / temp).softmax(-1)
    marginal = (p1 @ p2).double()
    got = generate(ee, None, [prompt] * n, "speculative", 2, temperature=temp, seed=3,
                   draft_k=2, adaptive=False, threshold=0, stop_at_eos=False,
                   **draft_kw)  # fmt: skip
    assert got.stats.accepted > accepted_share * n, "want many accepted drafts"
    second = torch.tensor([t[1] for t in got.tokens])
    freq = torch.bincount(second, minlength=VOCAB).double() / n
    tv = 0.5 * (freq - marginal).abs().sum()
    noise = 0.5 * (2 * marginal * (1 - marginal) / (torch.pi * n)).sqrt().sum()  # E[TV], exact
    assert tv < 1.4 * noise, f"total variation {tv:.3f}, sampling noise alone {noise:.3f}"


def test_sampled_tokens_follow_the_full_models_distribution(draft_ee):
    """The tiny model's logits are flat, so a low temperature makes its drafts often
    accepted."""
    assert_sampled_tokens_follow_the_full_model(draft_ee, 0.1, 0.2)


def test_save_load_round_trip_generates_the_same(draft_ee, tmp_path):
    save_exits(draft_ee, tmp_path)
    loaded = load_exits(draft_ee.model, tmp_path)
    assert loaded.kind == "draft" and loaded.exit_layers == [TOP]
    prompts = ragged_prompts()
    a = generate(draft_ee, None, prompts, "speculative", NEW)
    b = generate(loaded, None, prompts, "speculative", NEW)
    assert a.tokens == b.tokens and a.stats.accepted == b.stats.accepted


def test_unconfident_drafts_are_not_verified(draft_ee):
    """Above every draft's confidence, no round drafts: each is a plain decoding step."""
    prompts = ragged_prompts()
    got = generate(draft_ee, None, prompts, "speculative", NEW, threshold=1.01)
    assert got.tokens == full_greedy(draft_ee, prompts).tokens
    assert got.stats.drafted == 0 and got.stats.rounds == NEW - 1  # batch rounds after prefill


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox", "gptj", "mistral", "qwen2"])
def test_draft_trees_are_exact_on_other_architectures(arch, every_candidate):
    """Candidates share a position: learned positions (gpt2, opt), rotary (neox, partial;
    gptj, inside the attention) and sliding windows (mistral, qwen2) must all see it."""
    model = tiny_model(arch)
    ee = add_exits(model, [model.config.num_hidden_layers], kind="draft")
    prompts = ragged_prompts()
    got = generate(ee, None, prompts, "speculative", NEW, draft_width=8, threshold=0, draft_k=2)
    assert got.tokens == full_greedy(ee, prompts).tokens


def test_draft_trees_are_refused_where_positions_count_slots(every_candidate):
    ee = add_exits(tiny_model("bloom"), [TOP], kind="draft")
    with pytest.raises(ValueError, match="draft trees do not run on bloom"):
        generate(ee, None, [[5, 6]], "speculative", 4, draft_width=2)
    prompts = ragged_prompts()
    assert generate(ee, None, prompts, "speculative", NEW).tokens == full_greedy(ee, prompts).tokens


def test_the_draft_layers_q8_copy_is_made_once_per_set_of_weights():
    """generate() reuses the Q8_0 copy of a draft exit's block and head, and makes a new one
    after the exit's weights change (a tuning step, load_state_dict) or for another cut."""
    from eefast.generation.runner import _draft_exit_q8

    ee = add_exits(tiny_model("llama"), [TOP], kind="draft")
    draft = ee.exit(TOP)
    first = _draft_exit_q8(ee, draft, None)
    assert _draft_exit_q8(ee, draft, None) is first
    assert _draft_exit_q8(ee, draft, torch.arange(10)) is not first
    down = draft.block.block.mlp.down_proj
    with torch.no_grad():
        down.weight.add_(1.0)  # in place, as an optimizer step updates
    again = _draft_exit_q8(ee, draft, None)
    assert again is not first
    assert not torch.equal(again[0].mlp.down_proj.qweight, first[0].mlp.down_proj.qweight)

"""Draft vocabulary: the exit heads cut to the most frequent tokens. Speculative decoding stays
exact (greedy) and unbiased (sampling); the cut head scores only its tokens; files round-trip."""

import pytest
import torch

from eefast.exits import add_exits, load_exits, save_draft_vocab, save_exits
from eefast.generation import generate
from eefast.generation.decode import accept_sampled
from eefast.generation.draft_vocab import coverage, frequent_tokens
from eefast.generation.runner import Runner
from tiny_models import VOCAB, tiny_model, token_batch

NEW = 24


@pytest.fixture(scope="module")
def ee_with_vocab():
    ee = add_exits(tiny_model("llama"), [1, 2], kind="mlp")
    ee.draft_vocab = torch.arange(0, VOCAB, 2)  # every other token: half the head
    return ee


def prompts():
    ids = token_batch(3, 9, seed=11).tolist()
    return [ids[0], ids[1][:5], ids[2][:7]]


def test_frequent_tokens_and_coverage():
    blocks = torch.tensor([[5, 5, 5, 7, 7, 9], [9, 9, 9, 9, 3, 3]])
    assert frequent_tokens(blocks, 2).tolist() == [5, 9]  # 9 x5, 5 x3, then 7 and 3 x2
    assert frequent_tokens(blocks, 3).tolist() == [3, 5, 9]  # a tie goes to the lower id
    assert frequent_tokens(blocks, 2, always=[1]).tolist() == [1, 5, 9]
    assert frequent_tokens(blocks, 100).tolist() == [3, 5, 7, 9]  # only tokens that occur
    assert coverage(blocks, torch.tensor([5, 9])) == pytest.approx(8 / 12)
    with pytest.raises(ValueError, match="must be > 0"):
        frequent_tokens(blocks, 0)


@pytest.mark.parametrize("k,adaptive", [(1, False), (3, True)])
def test_speculative_greedy_with_a_draft_vocab_is_exact(ee_with_vocab, k, adaptive):
    want = generate(ee_with_vocab, None, prompts(), "full", NEW).tokens
    for exit_layer in (1, 2):
        got = generate(
            ee_with_vocab,
            None,
            prompts(),
            "speculative",
            NEW,
            exit_layer=exit_layer,
            draft_k=k,
            adaptive=adaptive,
            threshold=0,
        )
        assert got.tokens == want
        assert got.stats.drafted > 0
        if not adaptive:  # k half-size draft heads and one full verify head per round
            assert got.stats.head_calls == pytest.approx(got.stats.rounds * (k / 2 + 1))


def test_drafts_come_from_the_cut_head_only(ee_with_vocab):
    runner = Runner(ee_with_vocab, ee_with_vocab.draft_vocab)
    feat = torch.randn(5, 64)
    weight, bias = ee_with_vocab.head(2)
    full = feat @ weight.T + (0 if bias is None else bias)
    masked = torch.full_like(full, float("-inf"))
    ids = ee_with_vocab.draft_vocab
    masked[:, ids] = full[:, ids]
    st = runner.exit_head_stats(2, feat)
    assert torch.equal(st.argmax, masked.argmax(-1))
    assert torch.allclose(st.max_prob, masked.softmax(-1).amax(-1), atol=1e-5)
    assert runner.exit_vocab_size(2) == len(ids)
    h = torch.randn(5, 64)
    logits = runner.exit_logits(2, runner.exit_hidden(2, h))
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[ids] = False
    assert logits.shape == (5, VOCAB) and torch.isinf(logits[:, outside]).all()
    ref = ee_with_vocab.exit(2)(h) @ weight.T
    assert torch.allclose(logits[:, ids], ref[:, ids], atol=1e-4)
    assert runner.head_calls == pytest.approx(2 * len(ids) / VOCAB)  # two half-size passes


def test_acceptance_with_zero_draft_mass_still_follows_the_verifier():
    """min(1, p/q) acceptance with residual resampling emits tokens distributed as p even when
    q is zero on tokens p likes (they come only from the residual)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.1, 0.4, 0.2, 0.3])  # the verifier
    q = torch.tensor([0.5, 0.0, 0.5, 0.0])  # a draft over tokens {0, 2} only
    n = 20000
    d = torch.multinomial(q, n, replacement=True, generator=gen)[:, None]
    p_rows = torch.stack([p, p], 0).expand(n, 2, 4)  # positions 0 (checked) and 1 (next)
    q_rows = [q.expand(n, 4)]
    first = []
    for row in range(n):
        n_acc, nxt = accept_sampled(row, d, p_rows, q_rows, gen)
        first.append(int(d[row, 0]) if n_acc else nxt)
    freq = torch.bincount(torch.tensor(first), minlength=4).float() / n
    assert torch.allclose(freq, p, atol=0.015), freq


def test_generate_refuses_a_missing_draft_vocab_and_files_round_trip(tmp_path):
    ee = add_exits(tiny_model("llama"), [2], kind="norm")
    with pytest.raises(ValueError, match="no draft vocabulary"):
        generate(ee, None, [[5, 6, 7]], "speculative", 4, draft_vocab=True)
    save_exits(ee, tmp_path)
    ids = torch.tensor([1, 4, 9, 50])
    save_draft_vocab(tmp_path, ids, coverage=0.9)
    loaded = load_exits(tiny_model("llama"), tmp_path)
    assert torch.equal(loaded.draft_vocab, ids)
    save_exits(loaded, tmp_path)  # re-tuning keeps the vocabulary: it does not depend on them
    assert torch.equal(load_exits(tiny_model("llama"), tmp_path).draft_vocab, ids)
    save_draft_vocab(tmp_path, torch.tensor([3, VOCAB + 5]), coverage=1.0)
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        load_exits(tiny_model("llama"), tmp_path)

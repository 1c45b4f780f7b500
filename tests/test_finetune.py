"""Adapter fine-tuning loop and the arithmetic task: masking, learning, exact resume, errors."""

import json

import pytest
import torch

from eefast.adapters import (
    LoraConfig,
    PrefixConfig,
    SeriesConfig,
    add_adapters,
    mark_only_adapters_trainable,
)
from eefast.data import IGNORE, Example, arith, collate
from eefast.hf import decoder_stack
from eefast.train import FinetuneConfig, causal_lm_loss, finetune
from eefast.train.loop import batch_index
from tiny_models import ARCH_NAMES, VOCAB, tiny_model, token_batch


def examples(n=24, seed=0):
    """A learnable toy task: random prompts, one fixed response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(
            3, VOCAB, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g
        ).tolist()
        out.append(Example(prompt, [7, 8, 9, 1]))
    return out


def adapted_model(config=None):
    model = tiny_model("llama")
    add_adapters(model, config or LoraConfig(r=4, target_modules=("q_proj", "v_proj", "o_proj")))
    mark_only_adapters_trainable(model)
    return model


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_collate_masks_prompt_and_padding():
    batch = collate([Example([5, 6, 7], [8, 9]), Example([4], [3, 2, 1])], 16, 0, True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 2, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE] * 3 + [8, 9], [IGNORE, 3, 2, 1, IGNORE]]
    unmasked = collate([Example([5, 6], [8])], 16, 0, False)
    assert unmasked["labels"].tolist() == [[5, 6, 8]]
    truncated = collate([Example([5, 6, 7], [8, 9])], 4, 0, True)
    assert truncated["labels"].tolist() == [[IGNORE] * 3 + [8]]


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("prefix", [False, True])
def test_fused_loss_equals_hf_loss_and_grads(arch, prefix):
    model = tiny_model(arch)
    add_adapters(model, PrefixConfig(num_virtual_tokens=3) if prefix else LoraConfig(r=4))
    mark_only_adapters_trainable(model)
    ids = token_batch(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :3] = IGNORE
    params = [p for p in model.parameters() if p.requires_grad]
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    want_grads = torch.autograd.grad(want, params)
    got = causal_lm_loss(model, ids, mask, labels)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config", [LoraConfig(r=4), SeriesConfig(bottleneck_size=8)])
def test_loss_falls(config):
    model = adapted_model(config)
    log = finetune(
        model,
        examples(),
        FinetuneConfig(steps=30, batch_size=8, lr=3e-2, warmup_steps=2),
        progress=False,
    )
    first = sum(r["loss"] for r in log[:3]) / 3
    last = sum(r["loss"] for r in log[-3:]) / 3
    assert last < 0.92 * first, (first, last)
    assert all(r["tokens"] > 0 for r in log)


def test_grad_accumulation_equals_one_big_batch():
    """2 micro-batches of 4 accumulate the gradient of one batch of those 8 examples (every
    example has 4 response tokens, so each micro-batch's mean weighs the same)."""
    config = FinetuneConfig(steps=1, batch_size=4, grad_accum=2, lr=1e-3)
    data = examples()
    reference = adapted_model()
    idx = [batch_index(len(data), 4, micro, config.seed) for micro in range(2)]
    big = collate([data[i] for i in torch.cat(idx).tolist()], config.max_len, 0, True)
    params = [p for p in reference.parameters() if p.requires_grad]
    want = torch.autograd.grad(causal_lm_loss(reference, **big), params)

    model = adapted_model()
    got = [torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
    for acc, p in zip(got, (p for p in model.parameters() if p.requires_grad), strict=True):
        p.register_hook(lambda g, acc=acc: acc.add_(g))  # every micro-batch's backward
    log = finetune(model, data, config, progress=False)
    assert log[0]["tokens"] == 8 * 4  # 4 response tokens per example
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    config = FinetuneConfig(steps=9, batch_size=4, lr=5e-3, warmup_steps=2, save_every=3)
    straight = adapted_model()
    straight_log = finetune(straight, examples(), config, tmp_path / "a", progress=False)

    interrupted = adapted_model()
    stack = decoder_stack(interrupted)  # what finetune's fused loss calls
    forward, calls = stack.forward, []

    def ctrl_c_at_step_6(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    stack.forward = ctrl_c_at_step_6
    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted, examples(), config, tmp_path / "b", progress=False)
    saved = json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())
    assert saved["step"] == 5  # Ctrl-C saved the 5 finished steps
    resumed = adapted_model()  # a fresh process: new model, state only from the checkpoint
    resumed_log = finetune(resumed, examples(), config, tmp_path / "b", progress=False)
    for name, value in state(straight).items():
        assert torch.equal(state(resumed)[name], value), name
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in straight_log]
    latest = json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 9


def test_resume_refuses_another_run(tmp_path):
    finetune(
        adapted_model(),
        examples(),
        FinetuneConfig(steps=2, batch_size=2),
        tmp_path,
        fingerprint={"adapter": "lora"},
        progress=False,
    )
    with pytest.raises(ValueError, match="from another run"):
        finetune(
            adapted_model(),
            examples(),
            FinetuneConfig(steps=2, batch_size=2, lr=0.5),
            tmp_path,
            fingerprint={"adapter": "lora"},
            progress=False,
        )
    with pytest.raises(ValueError, match="from another run"):
        finetune(
            adapted_model(),
            examples(),
            FinetuneConfig(steps=2, batch_size=2),
            tmp_path,
            fingerprint={"adapter": "series"},
            progress=False,
        )


@pytest.mark.parametrize(
    "config,message",
    [
        (FinetuneConfig(steps=0), "steps must be positive"),
        (FinetuneConfig(batch_size=0), "batch_size must be positive"),
        (FinetuneConfig(lr=0.0), "lr must be positive"),
    ],
)
def test_bad_finetune_config(config, message):
    with pytest.raises(ValueError, match=message):
        finetune(adapted_model(), examples(), config, progress=False)


def test_nothing_to_train_is_refused():
    with pytest.raises(ValueError, match="no trainable parameters"):
        model = tiny_model()
        for p in model.parameters():
            p.requires_grad_(False)
        finetune(model, examples(), FinetuneConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="no training examples"):
        finetune(adapted_model(), [], FinetuneConfig(steps=1), progress=False)


def test_shipped_task_files_match_the_generator():
    for split in arith.SPLITS:
        assert arith.load_split(split) == arith.generate(split), split
    train = {r["instruction"] for r in arith.load_split("train")}
    test = arith.load_split("test")
    assert len(test) == 200 and not train & {r["instruction"] for r in test}
    for row in test:
        assert arith.last_number(row["output"]) == row["answer"]


@pytest.mark.parametrize(
    "text,number",
    [
        ("so 3 + 4 = 7. The answer is 7.", 7.0),
        ("1,250 apples", 1250.0),
        ("none", None),
        ("-3 left, or 2.5", 2.5),
    ],
)
def test_last_number(text, number):
    assert arith.last_number(text) == number


def test_max_len_that_cuts_every_example_is_refused():
    with pytest.raises(ValueError, match="cuts every example"):
        finetune(adapted_model(), examples(), FinetuneConfig(steps=1, max_len=1), progress=False)

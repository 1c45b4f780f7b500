"""eefast.patch on unmodified HF models, plain and under PEFT: the same loss and gradients as
unpatched, logits untouched without labels, unpatch restores, and HF Trainer trains a patched
model along the same loss curve."""

import warnings

import peft
import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import eefast
from eefast.data import IGNORE
from tiny_models import ARCH_NAMES, tiny_model, token_batch


def batch(seed=1):
    ids = token_batch(2, 10, seed)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :3] = IGNORE
    return ids, mask, labels


def loss_and_grads(model, **kw):
    model.train()
    ids, mask, labels = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)  # the same dropout masks, patched or not
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss
    return loss, torch.autograd.grad(loss, params)


def assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_patched_loss_and_grads_equal_hf(arch):
    model = tiny_model(arch)
    model.config.use_cache = False
    want = loss_and_grads(model)
    want_sum = loss_and_grads(model, num_items_in_batch=torch.tensor(9))
    report = eefast.patch(model)
    assert report.fused_loss and report.model_type == model.config.model_type
    assert_same(loss_and_grads(model), want)
    assert_same(loss_and_grads(model, num_items_in_batch=torch.tensor(9)), want_sum)
    eefast.unpatch(model)
    assert "forward" not in model.__dict__


def test_without_labels_or_in_eval_the_logits_are_hf_s():
    model = tiny_model("llama")
    ids, mask, labels = batch()
    want = model(input_ids=ids, attention_mask=mask, labels=labels)
    eefast.patch(model)
    model.eval()
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    model.train()
    assert model(input_ids=ids, attention_mask=mask).logits is not None
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is None  # fused


def peft_model(arch="llama", dropout=0.0, seed=0):
    model = tiny_model(arch)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt_neox"])
def test_peft_lora_runs_fused_with_the_same_loss_and_grads(arch):
    model = peft_model(arch)
    with torch.no_grad():  # B starts at zero; make the LoRA update count
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    want = loss_and_grads(model)
    report = eefast.patch(model)
    assert report.lora_layers and not report.left_alone
    calls = []
    handle = torch.ops.eefast.lora_linear.default
    orig = eefast.integrations.patching.lora_linear

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    eefast.integrations.patching.lora_linear = counting
    try:
        got = loss_and_grads(model)
    finally:
        eefast.integrations.patching.lora_linear = orig
    assert len(calls) == len(report.lora_layers) and handle is not None
    assert_same(got, want)
    eefast.unpatch(model)
    assert all("forward" not in model.get_submodule(n).__dict__ for n in report.lora_layers)
    assert_same(loss_and_grads(model), want)


def test_gpt2_conv1d_lora_is_left_to_peft_and_reported():
    model = tiny_model("gpt2")
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(model, config)
    want = loss_and_grads(model)
    report = eefast.patch(model)
    assert not report.lora_layers and all("Conv1D" in why for why in report.left_alone.values())
    assert_same(loss_and_grads(model), want)


def test_merged_or_disabled_adapters_take_peft_s_path():
    model = peft_model()
    eefast.patch(model)
    ids, mask, _ = batch()
    model.eval()
    with model.disable_adapter():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            model.get_base_model()(input_ids=ids, attention_mask=mask).logits,
        )
    before = model(input_ids=ids, attention_mask=mask).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before,
                               rtol=1e-4, atol=1e-5)  # fmt: skip


def test_bad_input():
    with pytest.raises(ValueError, match="'bert' models are not supported"):
        eefast.patch(T.BertForMaskedLM(T.BertConfig(vocab_size=16, hidden_size=8,
                                                    num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=8)))  # fmt: skip
    model = tiny_model("llama")
    eefast.patch(model)
    with pytest.warns(UserWarning, match="already patched"):
        eefast.patch(model)
    eefast.unpatch(model)
    eefast.unpatch(model)  # unpatching twice is harmless


def test_hf_trainer_trains_a_patched_peft_model_along_the_same_curve(tmp_path):
    ids, mask, labels = batch()
    rows = [{"input_ids": i, "attention_mask": m, "labels": lab}
            for i, m, lab in zip(ids.repeat(4, 1), mask.repeat(4, 1), labels.repeat(4, 1),
                                 strict=True)]  # fmt: skip
    curves, files = [], []
    for patched in (False, True):
        model = peft_model(seed=0)
        if patched:
            eefast.patch(model)
        args = T.TrainingArguments(
            output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2, logging_steps=1,
            report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = T.Trainer(model=model, args=args, train_dataset=rows)
            trainer.train()
            trainer.save_model()
        curves.append([r["loss"] for r in trainer.state.log_history if "loss" in r])
        files.append(sorted(p.name for p in (tmp_path / str(patched)).iterdir() if p.is_file()))
    assert len(curves[0]) == 4
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)
    assert files[0] == files[1] and "adapter_model.safetensors" in files[1]


def test_early_exit_model_loss_under_labels_equals_ee_tune_s():
    from eefast.data import next_token_targets

    ee = eefast.add_exits(tiny_model("llama"), [1, 2], kind="mlp").set_loss([1.0, 0.5], 0.5, 1e-3)
    ids = token_batch(2, 10)
    got = ee(input_ids=ids, labels=ids)
    states = ee.backbone_states(ids, need_final=True)
    want, per_exit = ee.exit_losses(states, next_token_targets(ids), [1.0, 0.5], 0.5, 1e-3)
    torch.testing.assert_close(got.loss, want)
    torch.testing.assert_close(got.exit_losses, per_exit)
    summed = ee(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(7))
    torch.testing.assert_close(summed.loss * 7, want * 18)  # 2 rows x 9 next-token targets
    torch.testing.assert_close(ee(input_ids=ids).logits, ee.model(input_ids=ids).logits)


def test_hf_trainer_trains_only_the_exits(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)  # shared tensors, as in SmolLM2
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    ee = eefast.add_exits(model, [1, 2], kind="norm")
    start = {k: v.clone() for k, v in ee.exits.state_dict().items()}
    ids = token_batch(8, 10)
    rows = [{"input_ids": i, "labels": i} for i in ids]
    args = T.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=6,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = T.Trainer(model=ee, args=args, train_dataset=rows)
        trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, backbone[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, start[k]) for k, v in ee.exits.state_dict().items())
    assert not ee.model.training  # the frozen backbone never ran with dropout
    trainer.save_model(str(tmp_path / "trainer"))  # HF's own save: the exits' state only
    saved = load_file(tmp_path / "trainer" / "model.safetensors")
    assert set(saved) == {f"exits.{k}" for k in ee.exits.state_dict()}
    ee.save_pretrained(tmp_path / "exits")
    loaded = eefast.load_exits(tiny_model("llama", tie_word_embeddings=True), tmp_path / "exits")
    for k, v in ee.exits.state_dict().items():
        assert torch.equal(loaded.exits.state_dict()[k], v)


def test_trl_sft_trainer_trains_a_patched_model_along_the_same_curve(tmp_path):
    trl = pytest.importorskip("trl")
    import datasets
    import tokenizers

    from tiny_models import VOCAB

    words = tokenizers.models.WordLevel({str(i): i for i in range(VOCAB)}, unk_token="0")
    tokenizer = T.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(words), pad_token="0", eos_token="1"
    )
    data = datasets.Dataset.from_list([{"input_ids": i.tolist()} for i in token_batch(8, 10)])
    curves = []
    for patched in (False, True):
        model = peft_model(seed=0)
        if patched:
            eefast.patch(model)
        config = trl.SFTConfig(
            output_dir=str(tmp_path / str(patched)), max_steps=3, per_device_train_batch_size=4,
            logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-2,
            seed=0,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data,
                                     processing_class=tokenizer)  # fmt: skip
            trainer.train()
        curves.append([r["loss"] for r in trainer.state.log_history if "loss" in r])
    assert len(curves[0]) == 3
    # Adam's first steps move each weight by about lr whatever its gradient's size, so the
    # last-bit differences between eefast's GEMMs and torch's grow to ~4e-4 by the third loss
    # on some CPUs (AVX2-only ones, where eefast's float32 GEMMs are ATen's rather than oneDNN's)
    assert curves[1] == pytest.approx(curves[0], rel=1e-3)


def test_patched_model_under_torch_compile_and_gradient_checkpointing():
    model = tiny_model("llama")
    want = loss_and_grads(model)
    eefast.patch(model)
    model.gradient_checkpointing_enable()
    assert_same(loss_and_grads(model), want)
    model.gradient_checkpointing_disable()
    compiled = torch.compile(model, backend="aot_eager")
    assert_same(loss_and_grads(compiled), want)


def test_gemma2_softcapped_loss_equals_hf():
    config = T.Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, max_position_embeddings=64, final_logit_softcapping=5.0,
                            use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    want = loss_and_grads(model)
    eefast.patch(model)
    assert_same(loss_and_grads(model), want)

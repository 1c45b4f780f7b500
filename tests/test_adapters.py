"""The adapter family on tiny random models of every architecture: identity at init, training,
merge/unmerge, save/load, PEFT interop both ways, prefix + KV cache, switching, bad configs."""

import json
import warnings

import peft
import pytest
import torch

from eefast.adapters import (
    IA3Config,
    LoraConfig,
    ParallelConfig,
    PrefixConfig,
    SeriesConfig,
    adapters,
    add_adapters,
    load_adapter,
    mark_only_adapters_trainable,
    remove_adapter,
    save_adapter,
)
from tiny_models import ARCH_NAMES, tiny_model, token_batch

CONFIGS = {
    "lora": lambda: LoraConfig(r=4, alpha=8),
    "series": lambda: SeriesConfig(bottleneck_size=8, placement="houlsby", scaling="learned"),
    "pfeiffer": lambda: SeriesConfig(bottleneck_size=8, activation="gelu"),
    "parallel": lambda: ParallelConfig(bottleneck_size=8, scaling=2.0, activation="silu"),
    "prefix": lambda: PrefixConfig(num_virtual_tokens=3),
    "prefix_mlp": lambda: PrefixConfig(num_virtual_tokens=2, projection_size=16),
    "ia3": lambda: IA3Config(),
}
IDENTITY_AT_INIT = ["lora", "series", "pfeiffer", "parallel", "ia3"]
MERGEABLE = ["lora", "ia3"]


def perturb(adapter, scale=0.1, seed=0):
    """Move every adapter weight off its init, so tests see a non-trivial adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * scale)


def logits(model, ids=None):
    with torch.no_grad():
        return model(token_batch() if ids is None else ids).logits


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("method", IDENTITY_AT_INIT)
def test_unchanged_at_init(arch, method):
    model = tiny_model(arch)
    before = logits(model)
    add_adapters(model, CONFIGS[method]())
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_loss_goes_down_and_only_adapters_train(arch, method):
    model = tiny_model(arch)
    adapter = add_adapters(model, CONFIGS[method]())
    count = mark_only_adapters_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert count == sum(p.numel() for p in trainable) > 0
    assert {id(p) for p in trainable} == {id(p) for p in adapter.trainable_parameters()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = token_batch(2, 12)
    optimizer = torch.optim.Adam(trainable, lr=5e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss  # eval mode: no dropout noise in the comparison
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.005, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_unmerge_same_logits(arch, method):
    model = tiny_model(arch)
    adapter = add_adapters(model, CONFIGS[method]())
    perturb(adapter)
    want = logits(model)
    base_weights = [w.weight.detach().clone() for w in adapter._wrappers]
    adapter.merge()
    assert adapter.merged
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    adapter.unmerge()
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    for w, before in zip(adapter._wrappers, base_weights, strict=True):
        torch.testing.assert_close(w.weight, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["series", "parallel", "prefix"])
def test_merge_refused_where_impossible(method):
    adapter = add_adapters(tiny_model(), CONFIGS[method]())
    with pytest.raises(ValueError, match="cannot be merged"):
        adapter.merge()


def test_merge_refuses_non_finite_weights():
    model = tiny_model()
    adapter = add_adapters(model, LoraConfig(r=2))
    with torch.no_grad():
        adapter._wrappers[0].lora_b.fill_(float("inf"))
    with pytest.raises(ValueError, match="not finite"):
        adapter.merge()


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_save_load_round_trip(arch, method, tmp_path):
    model = tiny_model(arch)
    adapter = add_adapters(model, CONFIGS[method]())
    perturb(adapter)
    want = logits(model)
    save_adapter(model, tmp_path)
    fresh = tiny_model(arch)
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh), want)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("method", MERGEABLE)
def test_peft_loads_what_eefast_saves(arch, method, tmp_path):
    model = tiny_model(arch)
    perturb(add_adapters(model, CONFIGS[method]()))
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] in (
        "LORA",
        "IA3",
    )
    peft_model = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("method", MERGEABLE)
def test_eefast_loads_what_peft_saves(arch, method, tmp_path):
    config = (
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=None if arch != "gpt2" else ["c_attn"])
        if method == "lora"
        else peft.IA3Config(task_type="CAUSAL_LM")
    )
    peft_model = peft.get_peft_model(tiny_model(arch), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n or "ia3_l" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.eval().save_pretrained(tmp_path)
    model = tiny_model(arch)
    load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model), logits(peft_model), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("method", ["prefix", "prefix_mlp"])
def test_prefix_generation_uses_the_kv_cache_correctly(arch, method):
    """generate() with its KV cache == re-running the whole sequence without a cache, at every
    step, with a left-padded row; and the prefix really changes the logits."""
    model = tiny_model(arch)
    base_logits = logits(model)
    perturb(add_adapters(model, CONFIGS[method]()), scale=0.5)
    assert not torch.allclose(logits(model), base_logits, atol=1e-3)
    ids = token_batch(2, 5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=2,
            output_logits=True,
            return_dict_in_generate=True,
        )
        seq, seq_mask = ids, mask
        for step in range(5):
            ref = model(seq, attention_mask=seq_mask, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[step], ref, rtol=1e-4, atol=1e-4)
            nxt = out.sequences[:, seq.shape[1] : seq.shape[1] + 1]
            seq = torch.cat([seq, nxt], 1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(nxt)], 1)


def test_adapters_compose_and_switch_off_independently():
    model = tiny_model("llama")
    base = logits(model)
    lora = add_adapters(model, LoraConfig(r=4, target_modules=("o_proj", "v_proj")), "lora")
    series = add_adapters(model, SeriesConfig(bottleneck_size=8, placement="houlsby"), "series")
    perturb(lora, seed=1)
    perturb(series, seed=2)
    both = logits(model)
    series.disable()
    only_lora = logits(model)
    lora.disable()
    assert torch.equal(logits(model), base)
    series.enable()
    only_series = logits(model)
    lora.enable()
    assert torch.equal(logits(model), both)
    for a, b in ((both, only_lora), (both, only_series), (only_lora, base), (only_series, base)):
        assert not torch.allclose(a, b, atol=1e-4)
    # The series hooks on o_proj survive LoRA replacing o_proj, in either order.
    remove_adapter(model, "lora")
    torch.testing.assert_close(logits(model), only_series)
    remove_adapter(model, "series")
    assert torch.equal(logits(model), base)
    assert adapters(model) == {}


def test_learned_scale_gets_a_gradient():
    model = tiny_model()
    adapter = add_adapters(model, SeriesConfig(bottleneck_size=4, scaling="learned", init="normal"))
    mark_only_adapters_trainable(model)
    ids = token_batch()
    model(ids, labels=ids).loss.backward()
    scales = [m.scale for m in adapter.bottlenecks.values()]
    assert all(s.grad is not None and s.grad.abs() > 0 for s in scales)


def test_parallel_beside_chosen_linears():
    model = tiny_model("opt")
    adapter = add_adapters(model, ParallelConfig(bottleneck_size=4, target_modules=("fc1",)))
    assert len(adapter.targets) == 4
    module = next(iter(adapter.bottlenecks.values()))
    assert (module.down.in_features, module.up.out_features) == (64, 128)  # fc1: 64 -> 128


class NoCacheLlama(torch.nn.Module):
    """A causal LM whose forward takes no KV cache."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model()
        self.config = self.inner.config

    def forward(self, input_ids, labels=None):
        return self.inner(input_ids, labels=labels)


@pytest.mark.parametrize(
    "make,config,message",
    [
        (tiny_model, LoraConfig(target_modules=("nope",)), r"'nope' matches no module.*q_proj"),
        (tiny_model, LoraConfig(target_modules=("mlp",)), "not a linear layer"),
        (tiny_model, LoraConfig(r=0), "r must be a positive integer"),
        (tiny_model, LoraConfig(r=-2), "r must be a positive integer"),
        (tiny_model, SeriesConfig(bottleneck_size=65), "larger than the model's hidden size 64"),
        (tiny_model, ParallelConfig(bottleneck_size=100), "larger than the model's hidden size"),
        (tiny_model, SeriesConfig(placement="middle"), "placement must be"),
        (tiny_model, SeriesConfig(activation="swish"), "unknown activation"),
        (tiny_model, SeriesConfig(init="xavier"), "init must be"),
        (tiny_model, IA3Config(target_modules=("k_proj",)), "give both"),
        (tiny_model, PrefixConfig(num_virtual_tokens=0), "num_virtual_tokens"),
        (NoCacheLlama, PrefixConfig(), "prefix-tuning needs a model whose forward takes a KV"),
    ],
)
def test_bad_config_is_refused(make, config, message):
    with pytest.raises(ValueError, match=message):
        add_adapters(make(), config)


def test_unknown_architecture_lists_linear_names():
    model = tiny_model()
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match=r"'mystery'.*pass target_modules.*down_proj"):
        add_adapters(model, LoraConfig())
    add_adapters(model, LoraConfig(target_modules=("q_proj",)))  # explicit targets still work


def test_duplicates_and_conflicts_are_refused():
    model = tiny_model()
    add_adapters(model, LoraConfig())
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        add_adapters(model, SeriesConfig())
    with pytest.raises(ValueError, match="already carries a LoRALinear"):
        add_adapters(model, IA3Config(target_modules=("v_proj",), feedforward_modules=()), "x")
    add_adapters(model, PrefixConfig(), "p1")
    with pytest.raises(ValueError, match="one prefix per model"):
        add_adapters(model, PrefixConfig(), "p2")


def test_load_refuses_files_from_another_model(tmp_path):
    model = tiny_model("gpt2")
    add_adapters(model, SeriesConfig(bottleneck_size=4))
    save_adapter(model, tmp_path / "series")
    add_adapters(model, LoraConfig(r=2), "lora")
    save_adapter(model, tmp_path / "lora", "lora")
    with pytest.raises(ValueError, match="saved from a gpt2 model, not llama"):
        load_adapter(tiny_model("llama"), tmp_path / "series")
    with pytest.raises(ValueError, match="c_attn"):
        load_adapter(tiny_model("llama"), tmp_path / "lora")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(tiny_model(), tmp_path)


def test_loading_an_adapter_trained_on_another_base_model_warns(tmp_path):
    model = tiny_model("llama")
    model.config._name_or_path = "org/base-a"
    add_adapters(model, LoraConfig(r=4))
    save_adapter(model, tmp_path)
    other = tiny_model("llama")
    other.config._name_or_path = "org/base-b"
    with pytest.warns(UserWarning, match="trained on 'org/base-a'"):
        load_adapter(other, tmp_path)
    same = tiny_model("llama")
    same.config._name_or_path = "/models/base-a"  # the same model from a local copy: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(same, tmp_path)


def test_peft_config_with_a_fractional_rank_is_refused(tmp_path):
    model = tiny_model("llama")
    add_adapters(model, LoraConfig(r=4))
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg | {"r": 4.7}))
    with pytest.raises(ValueError, match="r must be an integer"):
        load_adapter(tiny_model("llama"), tmp_path)

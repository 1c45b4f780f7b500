"""add_exits on tiny random models of every supported architecture."""

import json

import pytest
import torch

import eefast
from eefast.exits import add_exits, load_exits, save_exits
from eefast.nn import EXIT_KINDS
from tiny_models import ARCH_NAMES, tiny_model, token_batch


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("kind", EXIT_KINDS)
def test_unused_exits_leave_the_model_unchanged(arch, kind):
    model = tiny_model(arch)
    ids = token_batch()
    with torch.no_grad():
        before = model(ids).logits
        ee = add_exits(model, [4] if kind == "draft" else [1, 3], kind=kind)
        after = ee(ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_layer_exit_before_the_last_block_reproduces_the_final_layer(arch):
    # A copy of the last block + final norm applied after L-1 blocks is the model itself.
    model = tiny_model(arch)
    ee = add_exits(model, [3], kind="layer")
    with torch.no_grad():
        states = ee.backbone_states(token_batch(), need_final=True)
        torch.testing.assert_close(ee.exit_hidden(3, states), states.final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_copy_init_norm_and_mlp_exits(arch):
    model = tiny_model(arch)
    ee_norm = add_exits(model, [2], kind="norm")
    states = ee_norm.backbone_states(token_batch())
    with torch.no_grad():
        # The norm exit starts as the untuned baseline: the final norm at that layer.
        torch.testing.assert_close(
            ee_norm.exit_hidden(2, states), ee_norm.baseline_hidden(2, states)
        )
        ee_mlp = add_exits(tiny_model(arch), [2], kind="mlp")
        h = states.hiddens[2]
        block = ee_mlp.exit(2).block
        assert not torch.equal(block(h), h)  # a real MLP, copied from block 2
        own = ee_mlp.parts.layers[1]
        for name, p in block.norm.named_parameters():
            assert torch.equal(
                p, dict(getattr(own, ee_mlp.parts.spec.mlp_norm).named_parameters())[name]
            )


def test_backbone_stops_after_the_deepest_exit():
    model = tiny_model("llama")
    ee = add_exits(model, [1, 2])
    ran = []
    for i, block in enumerate(ee.parts.layers):
        block.register_forward_hook(lambda *_a, i=i: ran.append(i))
    ee.backbone_states(token_batch())
    assert ran == [0, 1]
    ran.clear()
    ee.backbone_states(token_batch(), need_final=True)
    assert ran == [0, 1, 2, 3]


@pytest.mark.parametrize("share", [False, True])
def test_gradients_reach_only_the_exits(share):
    model = tiny_model("gpt2")
    ee = add_exits(model, [1, 2, 3], kind="mlp", share_lm_head=share)
    states = ee.backbone_states(token_batch())
    targets = token_batch(seed=5).reshape(-1)
    hiddens = [ee.exit_hidden(layer, states).flatten(0, 1) for layer in ee.exit_layers]
    weights = ee.final_head()[0] if share else [ee.head(layer)[0] for layer in ee.exit_layers]
    total, _ = eefast.multi_exit_cross_entropy(hiddens, weights, targets)
    total.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ee.exit_parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_fused_exit_loss_matches_eager_logits():
    model = tiny_model("llama")
    ee = add_exits(model, [2], kind="norm")
    states = ee.backbone_states(token_batch())
    h = ee.exit_hidden(2, states).flatten(0, 1)
    weight, _ = ee.head(2)
    targets = token_batch(seed=5).reshape(-1)
    fused = eefast.linear_cross_entropy(h, weight, targets)
    eager = torch.nn.functional.cross_entropy(h @ weight.t(), targets)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", EXIT_KINDS)
def test_save_load_round_trip(tmp_path, kind):
    model = tiny_model("opt")
    layers = [4] if kind == "draft" else [1, 3]
    ee = add_exits(model, layers, kind=kind, init="random")
    save_exits(ee, tmp_path)
    loaded = load_exits(tiny_model("opt"), tmp_path)
    assert loaded.exit_layers == layers and loaded.kind == kind
    states = ee.backbone_states(token_batch())
    with torch.no_grad():
        for layer in layers:
            assert torch.equal(loaded.exit_hidden(layer, states), ee.exit_hidden(layer, states))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exits.json", "exits.safetensors"]


def test_checkpoint_from_another_model_is_refused(tmp_path):
    save_exits(add_exits(tiny_model("llama", seed=0), [2]), tmp_path)
    with pytest.raises(ValueError, match="another model"):
        load_exits(tiny_model("llama", seed=1), tmp_path)
    with pytest.raises(ValueError, match="another model"):
        load_exits(tiny_model("qwen2"), tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": [0]}, ValueError, "out of range"),
        ({"layers": [4]}, ValueError, "out of range"),
        ({"layers": [1, 2, 1]}, ValueError, "duplicate"),
        ({"layers": []}, ValueError, "at least one"),
        ({"layers": [1.5]}, TypeError, "ints"),
        ({"layers": [1], "kind": "conv"}, ValueError, "unknown exit kind"),
        ({"layers": [1], "init": "zeros"}, ValueError, "init"),
        ({"layers": [1], "kind": "embed", "share_lm_head": True}, ValueError, "nothing to train"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        add_exits(tiny_model("llama"), **kwargs)


def test_unknown_architecture_lists_module_lists():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "odd"})()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(ValueError, match="unsupported architecture 'odd'.*blocks"):
        add_exits(Odd(), [1])


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("exits.json", "{truncated", "exits.json is damaged"),
        ("exits.json", None, "fingerprint lacks"),
        ("exits.safetensors", "not safetensors", "exits.safetensors is damaged"),
    ],
)
def test_a_damaged_exits_file_is_named(tmp_path, file, content, message):
    ee = add_exits(tiny_model("llama"), [1, 2], kind="norm")
    save_exits(ee, tmp_path)
    if content is None:  # an emptied fingerprint must not skip the model check
        cfg = json.loads((tmp_path / "exits.json").read_text())
        (tmp_path / "exits.json").write_text(json.dumps(cfg | {"fingerprint": {}}))
    else:
        (tmp_path / file).write_text(content)
    with pytest.raises(ValueError, match=message):
        load_exits(tiny_model("llama"), tmp_path)


def test_exits_of_another_structure_are_named(tmp_path):
    save_exits(add_exits(tiny_model("llama"), [1, 2], kind="mlp"), tmp_path)
    cfg = json.loads((tmp_path / "exits.json").read_text())
    (tmp_path / "exits.json").write_text(json.dumps(cfg | {"kind": "norm"}))
    with pytest.raises(ValueError, match="exits.safetensors is damaged"):
        load_exits(tiny_model("llama"), tmp_path)

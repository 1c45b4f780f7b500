"""ee_tune: a frozen backbone, exits that learn, exact resume, caches and clear errors."""

import json

import pytest
import torch

from eefast import TuneConfig, add_exits, ee_tune, evaluate_exits, load_exits
from eefast.data import load_documents, next_token_targets, split_blocks
from eefast.ops import reference
from eefast.train.loop import batch_index
from tiny_models import VOCAB, tiny_model


def blocks(n=24, seq=12, seed=0):
    # A learnable stream: token t+1 = token t + 1 (mod vocab) with a random start per block.
    start = torch.randint(3, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(seq)) % VOCAB


def config(**kw):
    return TuneConfig(
        **(
            {
                "steps": 8,
                "batch_size": 4,
                "lr": 1e-2,
                "eval_every": 4,
                "save_every": 3,
                "lr_warmup_steps": 2,
            }
            | kw
        )
    )


def exits_state(ee):
    return {k: v.clone() for k, v in ee.exits.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox"])
@pytest.mark.parametrize(("kind", "share"), [("norm", False), ("mlp", True), ("layer", True)])
def test_exits_learn_and_backbone_stays_frozen(arch, kind, share):
    model = tiny_model(arch)
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    ee = add_exits(model, [1, 2], kind=kind, share_lm_head=share)
    start = exits_state(ee)
    data = blocks()
    lr = 3e-3 if kind == "layer" else 1e-2  # a whole block wants a gentler step
    metrics = ee_tune(ee, data[:20], data[20:], config(steps=24, lr=lr), progress=False)
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])
    evals = [m for m in metrics if "eval_loss_exit1" in m]
    assert evals[-1]["eval_loss_exit2"] < evals[0]["eval_loss_exit2"]
    assert all(torch.equal(v, backbone[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, start[k]) for k, v in ee.exits.state_dict().items())


def test_kd_and_z_loss_train(tmp_path):
    """The first step's loss is the reference CE + z-loss + KD to the final layer, at the
    warmed-up exit weight; then the exit learns."""
    cfg = config(kd_weight=1.0, z_loss=1e-3, exit_weights=[2.0], exit_weight_warmup_steps=4)
    data = blocks()
    ee = add_exits(tiny_model("qwen2"), [2], kind="norm")
    ids = data[batch_index(len(data), cfg.batch_size, 0, cfg.seed)]
    with torch.no_grad():
        states = ee.backbone_states(ids, need_final=True)
        hidden = ee.exit_hidden(2, states)
        want = reference.linear_cross_entropy(
            hidden, ee.head(2)[0], next_token_targets(ids), z_loss=1e-3,
            teacher=(states.final, ee.final_head()[0]), kd_weight=1.0,
        ) * (2.0 * 1 / 4)  # fmt: skip
    metrics = ee_tune(ee, data, None, cfg, progress=False)
    assert metrics[0]["loss"] == pytest.approx(float(want), rel=1e-4)
    assert metrics[-1]["loss_exit2"] < metrics[0]["loss_exit2"]


@pytest.mark.parametrize("cache", [False, True])
def test_model_targets_are_the_models_greedy_next_tokens(cache, monkeypatch):
    """targets='model': every position's target (the last included) is the full model's argmax
    there, with or without the hidden cache, in training and held-out alike; the first step's
    loss is the reference CE against them."""
    data = blocks()
    ee = add_exits(tiny_model("llama"), [2], kind="norm")
    seen = []
    real = type(ee).exit_losses

    def exit_losses(self, states, targets, *args, **kw):
        seen.append((states.input_ids.clone(), targets.clone()))
        return real(self, states, targets, *args, **kw)

    monkeypatch.setattr(type(ee), "exit_losses", exit_losses)
    cfg = config(targets="model", cache_hidden=cache, steps=4, eval_every=4)
    metrics = ee_tune(ee, data[:20], data[20:], cfg, progress=False)
    assert len(seen) == 4 + 1  # four steps, one held-out batch
    with torch.no_grad():
        for ids, targets in seen:
            want = ee.model(ids).logits.argmax(-1).reshape(-1)
            assert torch.equal(targets, want)
            assert not torch.equal(targets, next_token_targets(ids))
    ids, targets = seen[0]
    fresh = add_exits(tiny_model("llama"), [2], kind="norm")
    with torch.no_grad():
        hidden = fresh.exit_hidden(2, fresh.backbone_states(ids))
        want = reference.linear_cross_entropy(hidden.flatten(0, 1), fresh.head(2)[0], targets)
    assert metrics[0]["loss"] == pytest.approx(float(want), rel=1e-4)


def test_corpora_join_with_plus(tmp_path):
    assert load_documents("chat+pydoc_data") == load_documents("chat") + load_documents()
    odd = tmp_path / "a+b.txt"  # a file whose name has a '+' is that file
    odd.write_text("one\n\ntwo")
    assert load_documents(str(odd)) == ["one", "two"]
    with pytest.raises(ValueError, match="empty name"):
        load_documents("chat+")


def test_resume_equals_uninterrupted(tmp_path):
    data = blocks()
    full = add_exits(tiny_model("llama"), [1, 3], kind="mlp")
    ee_tune(full, data[:20], data[20:], config(), tmp_path / "full", progress=False)

    interrupted = add_exits(tiny_model("llama"), [1, 3], kind="mlp")
    calls = []

    def interrupt(*_):
        calls.append(1)
        if len(calls) == 5:  # during step 5: steps 1-4 are done, 3 is checkpointed
            raise KeyboardInterrupt

    handle = interrupted.exit(1).register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        ee_tune(interrupted, data[:20], data[20:], config(), tmp_path / "resumed", progress=False)
    handle.remove()
    latest = json.loads((tmp_path / "resumed" / "checkpoint" / "latest.json").read_text())
    assert latest["step"] == 4  # Ctrl-C saved the work done so far
    so_far = load_exits(tiny_model("llama"), tmp_path / "resumed")  # usable as they are
    for k, v in interrupted.exits.state_dict().items():
        assert torch.equal(v, so_far.exits.state_dict()[k]), k

    resumed = add_exits(tiny_model("llama"), [1, 3], kind="mlp")
    metrics = ee_tune(resumed, data[:20], data[20:], config(), tmp_path / "resumed", progress=False)
    for k, v in full.exits.state_dict().items():
        assert torch.equal(v, resumed.exits.state_dict()[k]), k
    assert [m["step"] for m in metrics] == list(range(1, 9))
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))
    assert (tmp_path / "resumed" / "metrics.csv").read_text().startswith("step,")
    assert (tmp_path / "resumed" / "exits.safetensors").is_file()


def test_resume_refuses_another_model(tmp_path):
    data = blocks()
    ee_tune(
        add_exits(tiny_model("llama", seed=0), [1]),
        data,
        None,
        config(steps=2),
        tmp_path,
        progress=False,
    )
    with pytest.raises(ValueError, match="another model"):
        ee_tune(
            add_exits(tiny_model("llama", seed=3), [1]),
            data,
            None,
            config(steps=4),
            tmp_path,
            progress=False,
        )
    with pytest.raises(ValueError, match="has exits"):
        ee_tune(
            add_exits(tiny_model("llama", seed=0), [2]),
            data,
            None,
            config(steps=4),
            tmp_path,
            progress=False,
        )


@pytest.mark.parametrize("kind", ["norm", "layer"])
def test_hidden_cache_gives_the_same_training(tmp_path, kind):
    data = blocks()
    results = []
    for cache in (False, True, True):  # the third run reads the cache file the second wrote
        ee = add_exits(tiny_model("gpt2"), [1, 2], kind=kind, share_lm_head=True)
        cfg = config(
            cache_hidden=cache, cache_path=str(tmp_path / "cache.safetensors"), kd_weight=0.5
        )
        ee_tune(ee, data[:20], None, cfg, progress=False)
        results.append(exits_state(ee))
    assert (tmp_path / "cache.safetensors").is_file()
    for other in results[1:]:
        for k, v in results[0].items():
            torch.testing.assert_close(other[k], v, rtol=1e-5, atol=1e-6)


def test_evaluate_exits_reports_agreement():
    ee = add_exits(tiny_model("llama"), [1, 3], kind="layer")
    rows = evaluate_exits(ee, blocks(8), batch_size=4, progress=False)
    by = {(r["layer"], r["exit"]): r for r in rows}
    # The layer exit after block 3 is a copy of block 4 + final norm: the model itself.
    assert by[(3, "exit (layer)")]["agreement"] == 1.0
    assert by[(3, "exit (layer)")]["ppl"] == pytest.approx(by[(4, "final layer")]["ppl"], 1e-4)
    assert by[(1, "untuned baseline")]["agreement"] < 1.0
    assert all(0 <= r["conf>=0.5"] <= 1 for r in rows)


def test_bad_inputs(tmp_path):
    ee = add_exits(tiny_model("llama"), [1, 2])
    with pytest.raises(ValueError, match="exit_weights"):
        ee_tune(ee, blocks(), None, config(exit_weights=[1.0]), progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        ee_tune(ee, blocks(2), None, config(), progress=False)
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty"):
        load_documents(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError):
        load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="eval_blocks"):
        split_blocks(blocks(4), 4)


@pytest.mark.parametrize(
    "change",
    [{"lr": 2e-2}, {"seed": 1}, {"batch_size": 2}, {"kd_weight": 0.5}, "data"],
    ids=str,
)
def test_resume_refuses_another_run(tmp_path, change):
    data = blocks()
    ee_tune(add_exits(tiny_model("llama"), [1]), data, None, config(steps=2), tmp_path,
            progress=False)  # fmt: skip
    other_data = blocks(seed=5) if change == "data" else data
    kw = {} if change == "data" else change
    with pytest.raises(ValueError, match="from another run"):
        ee_tune(add_exits(tiny_model("llama"), [1]), other_data, None, config(steps=4, **kw),
                tmp_path, progress=False)  # fmt: skip
    # more steps, another cadence: the same run, resumed
    cadence = config(steps=4, save_every=1, eval_every=2)
    metrics = ee_tune(add_exits(tiny_model("llama"), [1]), data, None, cadence, tmp_path,
                      progress=False)  # fmt: skip
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("latest.json", "{oops", "latest.json is damaged"),
        ("latest.json", '{"directory": "/etc", "step": 2}', "not a checkpoint of this run"),
        ("latest.json", '{"directory": "step-0000002", "step": -1}', "latest.json is damaged"),
        ("step-0000002/state.json", "[]", "state.json is damaged"),
        ("step-0000002/optimizer.safetensors", "truncated", "optimizer.safetensors is damaged"),
        ("step-0000002/model.safetensors", "", "model.safetensors is damaged"),
    ],
)
def test_a_damaged_checkpoint_is_named(tmp_path, file, content, message):
    data = blocks()
    ee_tune(add_exits(tiny_model("llama"), [1]), data, None, config(steps=2), tmp_path,
            progress=False)  # fmt: skip
    (tmp_path / "checkpoint" / file).write_text(content)
    with pytest.raises(ValueError, match=message):
        ee_tune(add_exits(tiny_model("llama"), [1]), data, None, config(steps=4), tmp_path,
                progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "kw",
    [
        {"eval_every": 0},
        {"save_every": 0},
        {"lr": float("nan")},
        {"z_loss": float("inf")},
        {"kd_weight": -1.0},
        {"exit_weights": [float("nan")]},
        {"targets": "teacher"},
    ],  # fmt: skip
    ids=str,
)
def test_bad_config_is_refused_before_any_step(kw):
    ee = add_exits(tiny_model("llama"), [1])
    with pytest.raises(ValueError, match="ee_tune"):
        ee_tune(ee, blocks(), None, config(**kw), progress=False)


@pytest.mark.parametrize("arch", ["llama", "opt"])  # gpt2's Conv1D calls addmm, not F.linear
def test_backbone_states_run_frozen_linears_on_eefasts_gemm(arch, monkeypatch):
    """Without grad, the backbone's F.linear calls go to decode_linear (oneDNN for many rows)
    and give the states F.linear gives; with grad on, F.linear runs as it is."""
    import eefast.nn.frozen_linears as frozen
    from tiny_models import token_batch

    model = tiny_model(arch)
    ee = add_exits(model, [1, 2], kind="norm")
    ids = token_batch(batch=4, seq=40)
    calls = []
    real = frozen.decode_linear

    def counting(x, w, b=None):
        calls.append(x.shape)
        return real(x, w, b)

    monkeypatch.setattr(frozen, "decode_linear", counting)
    got = ee.backbone_states(ids)
    assert calls and all(shape[:-1] in ((4, 40), (160,)) for shape in calls)  # opt's MLP: rows
    with torch.no_grad():
        want = ee.model.base_model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer, h in got.hiddens.items():
        torch.testing.assert_close(h, want[layer], rtol=1e-5, atol=1e-5)
    calls.clear()
    with frozen.frozen_linears():
        torch.nn.functional.linear(torch.randn(3, 8, requires_grad=True), torch.randn(5, 8))
    assert not calls

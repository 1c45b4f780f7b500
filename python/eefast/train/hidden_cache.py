"""Hidden-state cache: run the frozen backbone once and keep the exit layers' inputs.

EE-Tuning never changes the backbone, so its outputs at the exit layers are fixed. With the
cache, epochs after the first and hyper-parameter sweeps skip the backbone entirely. The cache
can be written to safetensors and reused by later runs; it records which model, layers and
token blocks it was built from and refuses to serve any other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..exits.files import check_fingerprint, model_fingerprint
from ..exits.model import BackboneStates, EarlyExitModel
from ..io import reading, write_safetensors


def blocks_digest(blocks: torch.Tensor) -> str:
    """A short digest of token blocks: equal data, equal string."""
    return hashlib.sha256(blocks.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class HiddenCache:
    """Exit-layer hidden states (and final-normed ones when KD needs them) per token block."""

    def __init__(
        self,
        hiddens: dict[int, torch.Tensor],
        final: torch.Tensor | None,
        block_args: tuple,
        block_kwargs: dict,
        meta: dict,
    ):
        self.hiddens, self.final = hiddens, final
        self.block_args, self.block_kwargs = block_args, block_kwargs
        self.meta = meta

    @classmethod
    def build(
        cls,
        ee: EarlyExitModel,
        blocks: torch.Tensor,
        batch_size: int,
        need_final: bool = False,
        dtype: torch.dtype = torch.float32,
        progress: bool = True,
        backbone=None,
    ) -> HiddenCache:
        """Run ``backbone(ids, need_final=...)`` (default: the exits' own backbone pass; a
        pipeline stage passes its part of one) over ``blocks`` and keep ``ee``'s exit
        layers' states."""
        backbone = backbone or ee.backbone_states
        layers = ee.exit_layers
        need_final = need_final or ee.needs_final
        # A draft exit reads only the final features (and the token ids, which are the blocks).
        stored = [] if ee.kind == "draft" else layers
        n, seq = blocks.shape
        d = ee.parts.lm_head.weight.shape[1]
        hiddens = {layer: torch.empty(n, seq, d, dtype=dtype) for layer in stored}
        final = torch.empty(n, seq, d, dtype=dtype) if need_final else None
        first = None
        for start in tqdm(
            range(0, n, batch_size),
            desc="caching hidden states",
            disable=not progress,
            unit="batch",
        ):
            ids = blocks[start : start + batch_size].to(ee.model.device)
            states = backbone(ids, need_final=need_final)
            for layer in stored:
                hiddens[layer][start : start + len(ids)] = states.hiddens[layer].to(dtype)
            if need_final:
                final[start : start + len(ids)] = states.final.to(dtype)
            if first is None:  # block arguments for batches of batch_size
                first = states
        meta = {
            "layers": layers,
            "blocks": blocks_digest(blocks),
            "need_final": need_final,
            "fingerprint": model_fingerprint(ee.model),
        }
        return cls(hiddens, final, first.block_args, first.block_kwargs, meta)

    @staticmethod
    def usable(path: Path, ee: EarlyExitModel, blocks: torch.Tensor, need_final: bool) -> bool:
        """Whether ``path`` holds a cache built for this model, these layers and blocks (a
        cache of another model is an error, not a miss)."""
        if not Path(path).is_file():
            return False
        with reading(path), safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["eefast"])
            check_fingerprint(meta["fingerprint"], ee.model, f"hidden-state cache {path}")
        return (
            meta["layers"] == ee.exit_layers
            and meta["blocks"] == blocks_digest(blocks)
            and (meta["need_final"] or not need_final)
        )

    def states(self, index: torch.Tensor, device) -> BackboneStates:
        """What `EarlyExitModel.backbone_states` would give for blocks ``index``."""
        hiddens = {layer: h[index].to(device, torch.float32) for layer, h in self.hiddens.items()}
        final = None if self.final is None else self.final[index].to(device, torch.float32)
        return BackboneStates(hiddens, final, self.block_args, self.block_kwargs)

    def save(self, path: Path) -> None:
        """Write the cache (not a ``layer`` exit's block arguments, which are rebuilt)."""
        tensors = {f"layer.{k}": v for k, v in self.hiddens.items()}
        if self.final is not None:
            tensors["final"] = self.final
        write_safetensors(path, tensors, metadata={"eefast": json.dumps(self.meta)})

    @classmethod
    def load(
        cls,
        path: Path,
        ee: EarlyExitModel,
        blocks: torch.Tensor,
        batch_size: int,
        need_final: bool,
        backbone=None,
    ) -> HiddenCache | None:
        """The cache at ``path`` if it was built for this model, these layers and blocks
        (``backbone`` as in `build`, for a ``layer`` exit's block arguments)."""
        if not cls.usable(path, ee, blocks, need_final):
            return None
        return cls.read(path, ee, blocks, batch_size, backbone)

    @classmethod
    def read(
        cls, path: Path, ee: EarlyExitModel, blocks: torch.Tensor, batch_size: int, backbone=None
    ) -> HiddenCache:
        """The cache at ``path``, which `usable` has accepted for these blocks."""
        with reading(path), safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["eefast"])
            hiddens = {
                int(k.removeprefix("layer.")): f.get_tensor(k)
                for k in f.keys()  # noqa: SIM118 (safe_open is not a dict)
                if k.startswith("layer.")
            }
            final = f.get_tensor("final") if meta["need_final"] else None
        block_args, block_kwargs = (), {}
        if ee.runs_a_block:  # positions/masks depend on the batch shape only
            probe = (backbone or ee.backbone_states)(blocks[:batch_size].to(ee.model.device))
            block_args, block_kwargs = probe.block_args, probe.block_kwargs
        return cls(hiddens, final, block_args, block_kwargs, meta)

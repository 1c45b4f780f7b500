"""add_exits: early-exit heads on a frozen Hugging Face causal LM, attached through hooks.

An exit "at layer l" reads the hidden states after the first l decoder blocks (1 <= l < L).
The wrapped model's own forward is untouched, so with exits attached but unused its outputs
are bit-identical; `backbone_states` runs the model without grad, records the exit layers'
outputs through forward hooks and stops after the deepest exit.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ModelOutput

from ..data.corpus import next_token_targets
from ..hf.arch import DecoderParts, decoder_parts
from ..nn.exit_classifier import ExitClassifier
from ..nn.exit_head import (
    EXIT_KINDS,
    ExitHead,
    FeatureDraft,
    ResidualMLP,
    block_output,
    previous_features,
)
from ..nn.frozen_linears import frozen_linears
from ..nn.quantized import float_copy
from ..ops import multi_exit_cross_entropy

# The confidence thresholds every per-exit report shows (share of tokens whose exit max-prob
# reaches each).
CONFIDENCE_THRESHOLDS = (0.5, 0.8, 0.9)
# A draft exit's loss adds this weight times the smooth-L1 distance of its predicted top
# feature to the real one (EAGLE's regression term), so feeding its output back as the next
# step's feature stays close to what the model would have computed.
DRAFT_FEATURE_WEIGHT = 1.0
# ... and this weight times the loss of a second draft step, whose input is the first step's
# predicted feature instead of the real one: drafts after the first are made that way, and a
# draft trained on real features only gets them wrong (its prediction is far from the real
# feature, so the second step sees inputs it never trained on).
DRAFT_STEP2_WEIGHT = 1.0


@dataclass
class ExitLoss:
    exit_weights: list[float] | None = None  # per exit; None: all 1
    kd_weight: float = 0.0
    z_loss: float = 0.0


@dataclass
class ExitsOutput(ModelOutput):
    """What ``EarlyExitModel.forward`` returns with labels."""

    loss: torch.Tensor | None = None
    exit_losses: torch.Tensor | None = None  # per exit, detached


class _StopBackbone(Exception):
    """Raised by the deepest exit's hook: nothing past it is needed."""


@dataclass
class BackboneStates:
    """What one frozen backbone pass gives the exits."""

    hiddens: dict[int, torch.Tensor]  # exit layer -> [batch, seq, d] output of that many blocks
    final: torch.Tensor | None = None  # final-normed hidden states, when asked for
    block_args: tuple = ()  # what the blocks were called with besides hidden states
    block_kwargs: dict = field(default_factory=dict)
    input_ids: torch.Tensor | None = None  # what a draft exit embeds


def _without_cache(value):
    """Drop KV caches from captured block arguments: an exit block runs cache-free."""
    return None if type(value).__name__.endswith("Cache") else value


class EarlyExitModel(nn.Module):
    """A causal LM plus early-exit heads. Only the heads are trainable."""

    def __init__(self, model: nn.Module, parts: DecoderParts, exits: dict[int, ExitHead]):
        super().__init__()
        self.model = model
        self.parts = parts
        self.exits = nn.ModuleDict({str(layer): exits[layer] for layer in sorted(exits)})
        self.classifier: ExitClassifier | None = None  # eefast train-classifier fits one
        self.draft_vocab: torch.Tensor | None = None  # token ids; eefast draft-vocab picks them
        self.loss = ExitLoss()  # what forward(labels=...) computes; see set_loss

    @property
    def exit_layers(self) -> list[int]:
        return [int(k) for k in self.exits]

    @property
    def num_layers(self) -> int:
        return len(self.parts.layers)

    @property
    def kind(self) -> str:
        return next(iter(self.exits.values())).kind

    @property
    def needs_final(self) -> bool:
        """Whether the exits read the final-normed top features (a draft exit does)."""
        return self.kind == "draft"

    @property
    def runs_a_block(self) -> bool:
        """Whether the exits run a copy of a decoder block, which takes the backbone's block
        arguments (positions, masks): ``layer`` and ``draft`` exits."""
        return self.kind in ("layer", "draft")

    @property
    def shares_lm_head(self) -> bool:
        return next(iter(self.exits.values())).lm_head is None

    def exit(self, layer: int) -> ExitHead:
        return self.exits[str(layer)]

    def head(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the exit's LM head (the model's own when shared)."""
        lm_head = self.exit(layer).lm_head or self.parts.lm_head
        return lm_head.weight, lm_head.bias

    def final_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.parts.lm_head.weight, self.parts.lm_head.bias

    def exit_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.exits.parameters() if p.requires_grad)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        """Without ``labels``: the unchanged model. With ``labels`` (HF's convention: the next
        token is the target, ``-100`` ignored): an output whose ``loss`` is the weighted
        multi-exit loss set by ``set_loss`` (per-exit losses in ``exit_losses``), computed as
        ``ee_tune`` does, so HF Trainer trains only the exits. ``num_items_in_batch`` (HF
        Trainer's gradient accumulation) makes it a sum over the batch divided by that count."""
        if labels is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        if self.kind == "draft" and attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("a draft exit trains on unpadded blocks; drop the attention mask")
        cfg = self.loss
        states = self.backbone_states(input_ids, attention_mask, need_final=cfg.kd_weight > 0)
        weights = cfg.exit_weights or [1.0] * len(self.exits)
        reduction = "mean" if num_items is None else "sum"
        total, losses = self.exit_losses(states, next_token_targets(labels), weights,
                                         cfg.kd_weight, cfg.z_loss, reduction)  # fmt: skip
        if num_items is not None:
            total = total / torch.as_tensor(num_items, device=total.device, dtype=total.dtype)
        return ExitsOutput(loss=total, exit_losses=losses)

    def set_loss(
        self, exit_weights: list[float] | None = None, kd_weight: float = 0.0, z_loss: float = 0.0
    ) -> EarlyExitModel:
        """The loss ``forward(..., labels=...)`` computes: per-exit weights (default all 1), KD
        to the final layer and z-loss, as in ``TuneConfig``."""
        if exit_weights is not None and len(exit_weights) != len(self.exits):
            raise ValueError(f"set_loss: {len(self.exits)} exits but {len(exit_weights)} weights")
        for name, value in (("kd_weight", kd_weight), ("z_loss", z_loss),
                            *(("exit weight", w) for w in exit_weights or ())):  # fmt: skip
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"set_loss: {name} must be a finite number >= 0, got {value}")
        self.loss = ExitLoss(exit_weights, kd_weight, z_loss)
        return self

    def train(self, mode: bool = True) -> EarlyExitModel:
        """Train mode for the exits; the frozen backbone stays in eval (no dropout there)."""
        super().train(mode)
        self.model.eval()
        return self

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The exits only (``exits.*``): the frozen base model is not this module's state and is
        saved (once) by its own ``save_pretrained``. So a trainer that saves ``state_dict()``
        (HF Trainer does for a model that is not a ``PreTrainedModel``) writes the exits alone,
        and tied embeddings never meet safetensors' shared-memory check."""
        return self.exits.state_dict(*args, destination=destination, prefix=prefix + "exits.",
                                     keep_vars=keep_vars)  # fmt: skip

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load what ``state_dict`` gives (``exits.*`` keys); other keys are refused when
        ``strict``."""
        other = sorted(k for k in state_dict if not k.startswith("exits."))
        if strict and other:
            raise ValueError(f"EarlyExitModel.load_state_dict: not exits: {other[:3]}")
        exits = {k.removeprefix("exits."): v for k, v in state_dict.items() if k not in other}
        return self.exits.load_state_dict(exits, strict=strict, assign=assign)

    def save_pretrained(self, directory, **_ignored) -> None:
        """Write the exits only (``save_exits``): what ``load_exits`` reads."""
        from .files import save_exits

        save_exits(self, directory)

    def exit_losses(
        self,
        states: BackboneStates,
        targets: torch.Tensor,
        exit_weights: list[float],
        kd_weight: float = 0.0,
        z_loss: float = 0.0,
        reduction: str = "mean",
    ):
        """(weighted total, per-exit losses) of the exits on one backbone pass, through the
        fused LM-head + CE ops; ``targets`` are flat, one per position."""
        layers = self.exit_layers
        hiddens = [self.exit_hidden(layer, states).flatten(0, -2) for layer in layers]
        if self.kind == "draft":  # the second step is one more exit on the same head
            hiddens.append(self._second_draft_step(hiddens[0], states))
            exit_weights = [*exit_weights, DRAFT_STEP2_WEIGHT * exit_weights[0]]
            layers = [*layers, *layers]
        teacher = None
        if kd_weight > 0:
            teacher = (states.final.flatten(0, -2), self.final_head()[0])
        if self.shares_lm_head:
            weight, bias = self.final_head()
        else:
            weight, bias = (list(h) for h in zip(*(self.head(la) for la in layers), strict=True))
        total, losses = multi_exit_cross_entropy(hiddens, weight, targets, exit_weights,
                                                 bias=bias, reduction=reduction, z_loss=z_loss,
                                                 teacher=teacher, kd_weight=kd_weight)  # fmt: skip
        if self.kind == "draft":
            reg = F.smooth_l1_loss(hiddens[0], states.final.flatten(0, -2), reduction=reduction)
            total = total + DRAFT_FEATURE_WEIGHT * exit_weights[0] * reg
            losses = losses[:1]  # the first step's: the draft exit's own loss
        return total, losses

    @contextmanager
    def _hooks(
        self, layers: Iterable[int], stop: bool, states: BackboneStates, first_block: int = 0
    ):
        """Record the given exit layers' outputs (and, for exits that run a block, the block
        arguments seen by block ``first_block``, the first one run); with ``stop``, end the
        pass after the deepest."""
        layers = list(layers)
        deepest = max(layers, default=0)
        handles = []

        def record(layer):
            def hook(_module, _args, output):
                states.hiddens[layer] = block_output(output)
                if stop and layer == deepest:
                    raise _StopBackbone

            return hook

        def record_args(_module, args, kwargs):
            states.block_args = tuple(_without_cache(a) for a in args[1:])
            states.block_kwargs = {k: _without_cache(v) for k, v in kwargs.items()}
            if "use_cache" in kwargs:
                states.block_kwargs["use_cache"] = False

        try:
            for layer in layers:
                handles.append(self.parts.layers[layer - 1].register_forward_hook(record(layer)))
            if self.runs_a_block:
                first = self.parts.layers[first_block]
                handles.append(first.register_forward_pre_hook(record_args, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def backbone_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        need_final: bool = False,
        layers: Iterable[int] | None = None,
    ) -> BackboneStates:
        """Run the frozen backbone without grad up to the deepest exit (or to the end when
        ``need_final``) and return the exit layers' hidden states."""
        layers = list(self.exit_layers if layers is None else layers)
        need_final = need_final or self.needs_final
        states = BackboneStates(hiddens={}, input_ids=input_ids)
        stop = not need_final
        with self._hooks(layers, stop, states), frozen_linears():
            try:
                out = self.model.base_model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                )
            except _StopBackbone:
                out = None
        if need_final:
            states.final = out[0]
        return states

    def exit_hidden(self, layer: int, states: BackboneStates) -> torch.Tensor:
        """The exit's hidden state just before its LM head (with grad through the exit)."""
        h = self.draft_inputs(states) if self.kind == "draft" else states.hiddens[layer]
        return self.exit(layer)(h, states.block_args, states.block_kwargs)

    def draft_inputs(self, states: BackboneStates, feats: torch.Tensor | None = None):
        """A draft exit's input at each position s: [embed(x_s), f_{s-1}] (zeros at s = 0),
        where f is the real top feature unless ``feats`` [batch, seq, d] gives others."""
        prev = previous_features(states.final if feats is None else feats)
        return torch.cat([self.model.get_input_embeddings()(states.input_ids), prev], -1)

    def _second_draft_step(self, first: torch.Tensor, states: BackboneStates) -> torch.Tensor:
        """The draft exit run again with its own (detached) first-step predictions as the
        previous features; flat like ``first``. Every position is a second step at once, so
        its context is predicted too, where decoding has real features: a close stand-in."""
        predicted = first.detach().view_as(states.final)
        x = self.draft_inputs(states, predicted)
        layer = self.exit_layers[0]
        return self.exit(layer)(x, states.block_args, states.block_kwargs).flatten(0, -2)

    def baseline_hidden(self, layer: int, states: BackboneStates) -> torch.Tensor:
        """The untuned baseline exit: the model's final norm applied at ``layer``."""
        return self.parts.final_norm(states.hiddens[layer])


def _reinit(module: nn.Module) -> None:
    """Random init for init='random': Linear/Embedding reset, norms to identity."""
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        elif "norm" in type(m).__name__.lower():
            for name, p in m.named_parameters(recurse=False):
                nn.init.ones_(p) if name == "weight" else nn.init.zeros_(p)


def _check_layers(layers, num_layers: int, kind: str) -> list[int]:
    if isinstance(layers, int):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("add_exits: give at least one exit layer")
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"add_exits: exit layers must be ints, got {layer!r}")
        if kind == "draft":
            if layer != num_layers:
                raise ValueError(
                    f"add_exits: a 'draft' exit sits on top of the last block; give layer "
                    f"{num_layers} (this model's number of blocks), got {layer}"
                )
        elif not 1 <= layer < num_layers:
            raise ValueError(
                f"add_exits: exit layer {layer} out of range; this model has {num_layers} "
                f"blocks, so exits go after 1..{num_layers - 1} blocks"
            )
    dupes = sorted({x for x in layers if layers.count(x) > 1})
    if dupes:
        raise ValueError(f"add_exits: duplicate exit layers {dupes}")
    return sorted(layers)


def _own_cache_layer(block: nn.Module, index: int) -> nn.Module:
    """A copied block that writes a KV cache's layer ``index`` instead of its original's."""
    for m in block.modules():
        if hasattr(m, "layer_idx"):
            m.layer_idx = index
    return block


def _feature_draft(parts: DecoderParts) -> FeatureDraft:
    """A draft exit's body: the last block's copy (its own KV-cache slot, after the model's
    blocks) behind fc([embedding, feature]) -> d, which starts as their sum."""
    block = _own_cache_layer(float_copy(parts.layers[-1]), len(parts.layers))
    ref = parts.lm_head.weight
    d = ref.shape[1]
    fc = nn.Linear(2 * d, d, bias=False, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        fc.weight.copy_(torch.cat([torch.eye(d), torch.eye(d)], 1))
    return FeatureDraft(fc, block)


def add_exits(
    model: nn.Module,
    layers: Iterable[int] | int,
    kind: str = "norm",
    init: str = "copy",
    share_lm_head: bool = False,
) -> EarlyExitModel:
    """Freeze ``model`` and attach early-exit heads after the given numbers of blocks.

    Copy init takes the norm from the final norm, the LM head from the model's (tied or not),
    an ``mlp`` exit's MLP (and its pre-norm) from the exit layer's own block, and a ``layer``
    exit's block from the last block. ``share_lm_head`` reuses the frozen LM head instead of
    copying it (less memory; only the rest of the exit trains).
    """
    if kind not in EXIT_KINDS:
        raise ValueError(f"add_exits: unknown exit kind {kind!r}; choose from {EXIT_KINDS}")
    if init not in ("copy", "random"):
        raise ValueError(f"add_exits: init must be 'copy' or 'random', got {init!r}")
    if kind == "embed" and share_lm_head:
        raise ValueError("add_exits: an 'embed' exit sharing the LM head has nothing to train")
    if isinstance(model, EarlyExitModel):
        raise ValueError("add_exits: the model already has exits; add them all in one call")
    parts = decoder_parts(model)
    layers = _check_layers(layers, len(parts.layers), kind)
    model.requires_grad_(False)
    model.eval()
    spec = parts.spec
    exits = {}
    for j, layer in enumerate(layers):
        block = None
        if kind == "mlp":
            own = parts.layers[layer - 1]
            block = ResidualMLP(
                copy.deepcopy(getattr(own, spec.mlp_norm)),
                [float_copy(getattr(own, name)) for name in spec.mlp],
                spec.mlp_adds_residual,
            )
        elif kind == "layer":  # generation gives it cache layer num_layers + j
            block = _own_cache_layer(float_copy(parts.layers[-1]), len(parts.layers) + j)
        elif kind == "draft":
            block = _feature_draft(parts)
        norm = None if kind == "embed" else copy.deepcopy(parts.final_norm)
        lm_head = None if share_lm_head else float_copy(parts.lm_head)
        head = ExitHead(kind, norm, lm_head, block)
        if init == "random":  # seeded per exit: the same weights whatever else is built
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((torch.initial_seed() + layer) % 2**63)
                _reinit(head)
        head.requires_grad_(True)
        exits[layer] = head
    return EarlyExitModel(model, parts, exits)

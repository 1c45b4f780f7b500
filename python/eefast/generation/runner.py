"""The runner that calls a model's own decoder blocks on any range of layers, its final norm
and LM head and its exits' heads, over a DecodeState (cache.py). What differs between
architectures (embeddings, positions, the block call) is the architecture table's ``decode``
column (hf/decode_calls.py); llama-family blocks may also run lean or fused (blocks.py)."""

from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..exits.model import EarlyExitModel
from ..hf.arch import GENERATION_ARCHS, decoder_stack
from ..hf.quantize import quantize_block
from ..nn.quantized import quantize, quantized_linear
from ..ops import decode_linear, exit_stats
from .blocks import FusedBlock, fused_block, hf_rotary, lean_attention, lean_block, run_fused
from .cache import DecodeState


class Runner:
    """Runs a model's embedding, blocks, final norm and heads piecewise.

    With ``draft_vocab`` (sorted token ids), the exit heads read only those rows: exit logits
    are -inf elsewhere and exit argmaxes lie inside it (see ``draft_vocab.py``). The final
    head always covers the whole vocabulary.

    A ``draft`` exit's block is one more layer here, index ``num_layers``, with its own
    slots in the KV cache (``cache_layers`` counts it). So is each ``layer`` exit's block,
    index ``num_layers + j`` for the j-th exit: every run that carries tokens past the exit's
    layer also runs its block on them, so its cache holds every token's keys and values, as
    the block saw them in training, and its output waits for ``exit_hidden``."""

    def __init__(self, ee: EarlyExitModel, draft_vocab: torch.Tensor | None = None):
        if ee.parts.spec.decode is None:
            raise ValueError(
                f"eefast.generate: {ee.parts.model_type!r} models are not supported yet; "
                f"generation runs on {list(GENERATION_ARCHS)}"
            )
        self.ee = ee
        self.arch = ee.parts.spec.decode
        self.base = decoder_stack(ee.model)
        self.layers: nn.ModuleList = ee.parts.layers
        self.num_layers = len(self.layers)
        self.draft = ee.exit(self.num_layers) if ee.kind == "draft" else None
        # layer exit -> its block's cache index; the output of its last run
        self.exit_blocks = {layer: self.num_layers + j for j, layer in enumerate(ee.exit_layers)
                            if ee.kind == "layer"}  # fmt: skip
        self._exit_out: dict[int, torch.Tensor] = {}
        exit_blocks = [ee.exit(layer).block for layer in self.exit_blocks]
        # A draft exit's block and head run on their Q8_0 copies where they can (drafts only
        # propose, so output is unchanged; _draft_exit_q8)
        q8 = _draft_exit_q8(ee, self.draft, draft_vocab) if self.draft else None
        draft_block = [q8[0] if q8 else self.draft.block.block] if self.draft else []
        self._draft_head = q8[1] if q8 else None
        blocks = [*self.layers, *draft_block, *exit_blocks]
        self.dtype = next(ee.model.parameters()).dtype
        # Weight passes, the cost that bounds decoding here: one per block per call (however
        # many tokens it carries) and one per LM-head evaluation (exit or final; an exit head
        # over the draft vocabulary counts as its share of the vocabulary).
        self.block_calls = 0
        self.head_calls = 0.0
        self.vocab_ids = draft_vocab
        # Per block, the attention function lean_block calls, or None: run the module; and
        # decode_block's arguments where the block qualifies for it (decode steps only).
        self.blocks = blocks
        self.lean = [lean_attention(layer) for layer in blocks]
        self.fused = [fused_block(layer, ee.parts.spec) for layer in blocks]
        self.windows = [_sliding_window(layer, ee.model.config) for layer in blocks]
        self._exit_heads: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def propagates_kv(self) -> bool:
        """Whether ``propagate_kv`` works here: llama-family blocks, no ``layer`` exits."""
        return self.arch.propagates_kv and not self.exit_blocks

    @property
    def cache_layers(self) -> int:
        """Layers of the KV cache: the model's blocks, then a draft exit's block or each
        ``layer`` exit's."""
        return len(self.blocks)

    @contextmanager
    def decode_linears(self):
        """While decoding, the blocks' and exits' plain nn.Linear layers (and GPT-2's Conv1D,
        a linear with its weight stored transposed) run through ``decode_linear``: a verify
        step or a small batch is a few rows, where MKL is slow, and ``decode_linear`` sums
        each row in an order that does not depend on how many rows there are. A module with
        its own instance-level forward (a hook library's) is left alone; all are restored
        after."""
        patched = [
            m
            for part in (self.layers, self.ee.exits)
            for m in part.modules()
            if type(m) in (nn.Linear, Conv1D) and "forward" not in m.__dict__
        ]
        for m in patched:
            m.forward = _decode_forward(m)
        try:
            yield
        finally:
            for m in patched:
                del m.forward

    def embed(self, ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """The embedding of ids [batch, q], the tokens of the state's last q slots (their
        positions, where the architecture adds learned ones)."""
        return self.arch.embed(self.base, ids, state.pos[:, -ids.shape[1] :])

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embedding alone (what a draft exit reads)."""
        return self.ee.model.get_input_embeddings()(ids)

    @staticmethod
    def _allowed(state: DecodeState, first: int, q: int, window: int | None, sees=None):
        """[batch, q, first + q]: the valid keys at or before each query slot, and with a
        sliding window, only those less than ``window`` positions back. ``sees [q, q]``
        (bool, lower triangular) narrows which of the q new slots each new slot sees: a draft
        tree's candidates see their ancestors only."""
        keys = state.valid[:, : first + q]
        key_slot = torch.arange(first + q, device=keys.device)
        query_slot = torch.arange(first, first + q, device=keys.device)
        allowed = keys[:, None, :] & (key_slot[None, None, :] <= query_slot[None, :, None])
        if sees is not None:
            allowed[:, :, first:] &= sees
        if window is not None:
            back = state.pos[:, first : first + q, None] - state.pos[:, None, : first + q]
            allowed &= back < window
        return allowed

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """The additive [batch, 1, q, keys] form of ``allowed`` that HF's blocks take."""
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[:, None]

    def run(
        self,
        h: torch.Tensor,
        start: int,
        end: int,
        state: DecodeState,
        fused: bool = True,
        blocks: list[FusedBlock | nn.Module] | None = None,
        sees: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blocks [start, end) on h [batch, q, d], whose tokens are the next q slots of each
        of those layers (layers in the range must hold the same number of slots). Blocks that
        qualify run as one ``decode_block`` call each unless ``fused`` is False (the prefill,
        whose many rows HF's attention handles better); ``blocks`` replaces the model's own
        blocks (a low-bit draft's: ``decode_block`` arguments or block modules). A ``layer``
        exit whose layer the run reaches (start < layer <= end) runs its block on the tokens
        there. ``sees`` limits which new tokens each new token attends to (``_allowed``)."""
        if start >= end:
            return h
        first, q = state.cache.lengths[start], h.shape[1]
        pos = state.pos[:, first : first + q]
        shared = self.arch.shared(self.base, h, pos, state.valid[:, : first + q])
        masks: dict = {}  # per attention window: (allowed, additive mask)
        for i in range(start, end):
            h = self._block(i, h, state, first, pos, shared, masks, fused, blocks, sees)
            cache_index = self.exit_blocks.get(i + 1)
            if cache_index is not None:
                out = self._block(cache_index, h, state, first, pos, shared, masks, fused)
                self._exit_out[i + 1] = out
        return h

    def _block(self, i, h, state, first, pos, shared, masks, fused, blocks=None, sees=None):
        """Block (cache layer) ``i`` on h, the tokens of slots first .. first + q."""
        assert state.cache.lengths[i] == first, "layers in one run must be in step"
        self.block_calls += 1
        window = self.windows[i]
        if window not in masks:
            allowed = self._allowed(state, first, h.shape[1], window, sees)
            masks[window] = (allowed, self._mask(allowed))
        allowed, mask = masks[window]
        block = self.blocks[i] if blocks is None else blocks[i]
        fused_args = self.fused[i] if blocks is None else block
        if fused and isinstance(fused_args, FusedBlock):
            rotary = shared["position_embeddings"]
            return run_fused(fused_args, i, h, *rotary, allowed, state.cache)
        if blocks is None and self.lean[i] is not None:
            rotary = shared["position_embeddings"]
            return lean_block(block, self.lean[i], h, rotary, mask, state.cache)
        out = self.arch.call(block, h, mask, state.cache, pos, shared)
        return out[0] if isinstance(out, tuple) else out

    def propagate_kv(self, h: torch.Tensor, start: int, end: int, state: DecodeState) -> None:
        """CALM-style KV for blocks [start, end) that a token skipped: each block's keys and
        values come from the exited hidden state h [batch, q, d], as if it had been copied
        upward. Only each block's input norm and K/V projections run (no query, attention or
        MLP), which is what makes this cheaper than recomputing."""
        first, q = state.cache.lengths[start], h.shape[1]
        cos_sin = self.base.rotary_emb(h, position_ids=state.pos[:, first : first + q])
        for i in range(start, end):
            assert state.cache.lengths[i] == first, "layers in one run must be in step"
            attn = self.layers[i].self_attn
            x = self.layers[i].input_layernorm(h)
            shape = (*h.shape[:-1], -1, attn.head_dim)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            _, k = hf_rotary(attn)(k, k, *cos_sin)  # the block's own rotary; no query here
            state.cache.update(k, v, i)

    def final_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.ee.parts.final_norm(h))

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """The LM head on final-normed features (its low-bit copy on a low-bit backbone)."""
        head = self.ee.parts.lm_head
        self.head_calls += 1
        if hasattr(head, "qweight"):  # hf.quantize_backbone
            return quantized_linear(feats, head.qweight, head.scales, head.bias).float()
        return decode_linear(feats, head.weight, head.bias).float()

    def draft_features(self, x: torch.Tensor, state: DecodeState, fused: bool = True):
        """The draft exit on x [batch, q, 2d] = [embedding, previous top feature] for the
        draft layer's next q slots: its predicted top features [batch, q, d]."""
        draft = self.draft
        h = self.run(draft.block.fc(x), self.num_layers, self.cache_layers, state, fused)
        return draft.norm(h)

    def exit_hidden(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Exit ``layer``'s pre-head hidden state for the last token of the last run that
        reached it, whose layer-``layer`` state is h [batch, d]. A ``layer`` exit's block has
        already run there (``run``); the other kinds run now."""
        exit_ = self.ee.exit(layer)
        if layer in self.exit_blocks:
            return exit_.norm(self._exit_out[layer][:, -1])
        return exit_(h)

    def exit_head(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of exit ``layer``'s head, cut to the draft vocabulary if there is
        one (the cut copy is made once per distinct head: a shared head is cut once)."""
        weight, bias = self.ee.head(layer)
        if self.vocab_ids is None:
            return weight, bias
        key = weight.data_ptr()
        if key not in self._exit_heads:
            ids = self.vocab_ids
            self._exit_heads[key] = (weight[ids], None if bias is None else bias[ids])
        return self._exit_heads[key]

    def exit_top(self, layer: int, feat: torch.Tensor, k: int):
        """(probabilities, token ids), each [B, k], of the k most likely tokens of exit
        ``layer``'s head on ``feat`` [B, d] (within the draft vocabulary if there is one)."""
        probs = self._exit_logits_cut(layer, feat).softmax(-1)
        top, ids = probs.topk(min(k, probs.shape[-1]), -1)
        return top, ids if self.vocab_ids is None else self.vocab_ids[ids]

    def _exit_logits_cut(self, layer: int, feat: torch.Tensor) -> torch.Tensor:
        """Exit ``layer``'s float32 logits over its head's rows (the draft vocabulary's, if
        cut); a draft exit's head reads its Q8_0 copy where it has one."""
        self._count_exit_head()
        if layer == self.num_layers and self._draft_head is not None:
            return quantized_linear(feat, *self._draft_head).float()
        return decode_linear(feat, *self.exit_head(layer)).float()

    def _count_exit_head(self) -> None:
        full = self.ee.parts.lm_head.weight.shape[0]
        self.head_calls += 1.0 if self.vocab_ids is None else len(self.vocab_ids) / full

    def exit_logits(self, layer: int, feat: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of exit ``layer``'s head on its pre-head hidden state
        ``feat`` (-inf outside the draft vocabulary)."""
        logits = self._exit_logits_cut(layer, feat)
        if self.vocab_ids is None:
            return logits
        vocab = self.ee.head(layer)[0].shape[0]
        full = logits.new_full((*logits.shape[:-1], vocab), float("-inf"))
        full[..., self.vocab_ids] = logits
        return full

    def exit_head_stats(self, layer: int, feat: torch.Tensor):
        """exit_stats of exit ``layer``'s head on its pre-head hidden state ``feat``; the
        argmax is a token id of the whole vocabulary either way."""
        self._count_exit_head()
        st = exit_stats(feat, *self.exit_head(layer))
        if self.vocab_ids is None:
            return st
        return st._replace(argmax=self.vocab_ids[st.argmax])

    def exit_vocab_size(self, layer: int) -> int:
        """How many tokens exit ``layer``'s head scores (for the entropy's scale)."""
        return (
            len(self.vocab_ids) if self.vocab_ids is not None else self.ee.head(layer)[0].shape[0]
        )


# ee -> (the draft exit's parameter versions, (its Q8_0 block module, Q8_0 head)): made once
# per set of weights (~40 ms on SmolLM2), remade after any update.
_DRAFT_Q8: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _draft_exit_q8(ee: EarlyExitModel, draft: nn.Module, vocab_ids: torch.Tensor | None):
    """Q8_0 copies of a draft exit's block (a module whose linears are Q8_0, which decodes as
    one ``decode_block`` call) and of its head (cut to ``vocab_ids``), or None where they
    cannot be made: a block that is not fused,
    float32 on the CPU, with input widths that are multiples of 32. A draft step then reads
    about a quarter of the bytes (SmolLM2, draft trees: 1.18x full depth against 1.14x,
    same acceptance, in one 5-repeat A/B); the verifier decides every token either way."""
    block = draft.block.block
    linears = [m for m in block.modules() if type(m) is nn.Linear]
    weight, bias = ee.head(ee.exit_layers[0])
    if (
        fused_block(block, ee.parts.spec) is None
        or weight.device.type != "cpu"
        or any(m.weight.dtype != torch.float32 or m.in_features % 32 for m in linears)
        or weight.dtype != torch.float32
        or weight.shape[1] % 32
    ):
        return None
    params = [*draft.parameters(), weight]
    key = (tuple((p.data_ptr(), p._version) for p in params),
           None if vocab_ids is None else vocab_ids.tolist())  # fmt: skip
    cached = _DRAFT_Q8.get(ee)
    if cached is None or cached[0] != key:
        low_bit = quantize_block(copy.deepcopy(block), "q8_0", "draft")
        if vocab_ids is not None:
            weight, bias = weight[vocab_ids], None if bias is None else bias[vocab_ids]
        cached = (key, (low_bit, (*quantize(weight, "q8_0"), bias)))
        _DRAFT_Q8[ee] = cached
    return cached[1]


def _sliding_window(layer: nn.Module, config) -> int | None:
    """How many positions back a block attends (None: all), as HF's masks apply it: qwen2
    sets it per block, mistral for every block; the other architectures have none."""
    attn = getattr(layer, "self_attn", None)
    if attn is not None and hasattr(attn, "sliding_window"):
        return attn.sliding_window
    if config.model_type not in ("mistral", "qwen2"):
        return None
    return getattr(config, "sliding_window", None)


def _decode_forward(linear: nn.Module):
    if type(linear) is Conv1D:  # weight [in, out]: transposed once, for this decoding run
        weight = linear.weight.t().contiguous()
        return lambda x: decode_linear(x, weight, linear.bias)
    return lambda x: decode_linear(x, linear.weight, linear.bias)

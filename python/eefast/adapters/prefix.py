"""Prefix-tuning: learned keys and values in front of every layer's attention, fed to the model
through its KV cache, so training, plain forwards and ``generate`` all see them.

The prefix does not shift the positions of real tokens: they are numbered from 0, as in the
model without the prefix (and as PEFT numbers them during generation).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from .config import PrefixConfig


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder's attention, from its HF config."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def check_prefix_support(model: nn.Module) -> None:
    """A clear error for models whose forward takes no KV cache (nothing to put a prefix in)."""
    params = inspect.signature(model.forward).parameters
    if "past_key_values" not in params or not getattr(model, "_supports_cache_class", True):
        raise ValueError(
            f"eefast: prefix-tuning needs a model whose forward takes a KV cache "
            f"(past_key_values); {type(model).__name__} has none. Use another adapter method."
        )


class PrefixEncoder(nn.Module):
    """The prefix: ``[P, layers · 2 · kv_heads · head_dim]``, learned directly or as a
    reparameterisation MLP (embedding → Linear → tanh → Linear) of width projection_size."""

    def __init__(self, config: PrefixConfig, model_config, device=None, dtype=None) -> None:
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = kv_geometry(model_config)
        self.num_virtual_tokens = config.num_virtual_tokens
        width = self.layers * 2 * self.kv_heads * self.head_dim
        kw = {"device": device, "dtype": dtype}
        if config.projection_size:
            hidden = model_config.get_text_config(decoder=True).hidden_size
            self.embedding = nn.Parameter(torch.randn(self.num_virtual_tokens, hidden, **kw))
            self.projection = nn.Sequential(
                nn.Linear(hidden, config.projection_size, **kw),
                nn.Tanh(),
                nn.Linear(config.projection_size, width, **kw),
            )
        else:
            self.embedding = nn.Parameter(torch.randn(self.num_virtual_tokens, width, **kw) * 0.02)
            self.projection = None

    def key_values(self) -> torch.Tensor:
        """``[layers, 2, kv_heads, P, head_dim]``."""
        flat = self.embedding if self.projection is None else self.projection(self.embedding)
        kv = flat.view(self.num_virtual_tokens, self.layers, 2, self.kv_heads, self.head_dim)
        return kv.permute(1, 2, 3, 0, 4)

    def fill(self, cache: Cache, batch: int) -> None:
        """Write the prefix into an empty cache, expanded over the batch (gradients flow)."""
        for layer, (k, v) in enumerate(self.key_values()):
            shape = (batch, *k.shape)
            cache.update(k.unsqueeze(0).expand(shape), v.unsqueeze(0).expand(shape), layer)


class PrefixHook:
    """A forward pre-hook on the decoder stack: a fresh call gets a cache holding the prefix,
    and every call that uses such a cache gets its 2-D attention mask extended and its
    positions made explicit."""

    def __init__(self, encoder: PrefixEncoder, model: nn.Module) -> None:
        self.encoder = encoder
        self.takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        self.model_config = model.config
        self.enabled = True

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.enabled:
            return None
        if args:  # model(input_ids, ...): make every input a keyword
            kwargs = {"input_ids": args[0], **kwargs}
            args = ()
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, length = tokens.shape[:2]
        prefix = self.encoder.num_virtual_tokens
        cache = kwargs.get("past_key_values")
        if cache is None or (cache.get_seq_length() == 0 and not getattr(cache, "_prefix", 0)):
            cache = cache if cache is not None else DynamicCache(config=self.model_config)
            self.encoder.fill(cache, batch)
            cache._prefix = prefix
            kwargs["past_key_values"] = cache
        elif not getattr(cache, "_prefix", 0):
            return args, kwargs  # a cache built elsewhere, without the prefix: leave it alone
        past = cache.get_seq_length() - prefix  # real tokens already in the cache
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] == past + length:
            ones = mask.new_ones(batch, prefix)
            kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)
        if self.takes_position_ids and kwargs.get("position_ids") is None:
            if mask is not None and mask.dim() == 2:
                positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -length:]
            else:
                positions = torch.arange(past, past + length, device=tokens.device)[None]
            kwargs["position_ids"] = positions
        return args, kwargs

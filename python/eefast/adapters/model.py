"""Adding adapters to a Hugging Face causal LM, switching them on and off, merging them.

Every adapter is an :class:`Adapter` registered under ``model.eefast_adapters[name]``, so it
moves with the model (``.to()``) and its weights appear in ``model.state_dict()``.
- LoRA and (IA)³ replace their target linears in place with wrappers (:class:`LoRALinear`,
  :class:`IA3Linear`) that keep the original weight and bias parameters.
- Series and parallel adapters are :class:`BottleneckAdapter` modules owned by the Adapter,
  run by forward hooks on the sublayers they follow or sit beside.
- Prefix-tuning hooks the causal LM's forward and feeds the prefix through the KV cache.
Several adapters can be active at once; each can be disabled, which restores its layers'
base computation exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..hf.arch import decoder_stack
from ..nn import BottleneckAdapter, IA3Linear, LoRALinear
from ..nn.replace import replace_module
from .config import (
    AdapterConfig,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    ParallelConfig,
    PrefixConfig,
    SeriesConfig,
)
from .prefix import PrefixEncoder, PrefixHook, check_prefix_support
from .targets import (
    ADAPTED_LINEARS,
    default_targets,
    find_targets,
    is_linear,
    linear_features,
    matches,
)


def _hidden_size(model: nn.Module) -> int:
    return model.config.get_text_config(decoder=True).hidden_size


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _with_first(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _key(path: str) -> str:
    return path.replace(".", "__")  # ModuleDict keys cannot contain dots


class Adapter(nn.Module):
    """One named adapter on a model: its config, its trainable modules and its hooks."""

    def __init__(self, name: str, config: AdapterConfig) -> None:
        super().__init__()
        self.name, self.config = name, config
        self.bottlenecks = nn.ModuleDict()  # series/parallel: target path -> adapter
        self.prefix: PrefixEncoder | None = None
        self.targets: list[str] = []  # module paths this adapter acts on
        # Not submodules (they live in the model tree already): LoRA/IA3 wrappers, hook handles.
        self.__dict__["_wrappers"] = []
        self.__dict__["_originals"] = []  # (path, the linear a wrapper replaced)
        self.__dict__["_handles"] = []  # (module path, hook handle)
        self.__dict__["_prefix_hook"] = None
        self.enabled = True

    @property
    def method(self) -> str:
        return self.config.method

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        for w in self._wrappers:
            if isinstance(w, LoRALinear):
                yield from (w.lora_a, w.lora_b)
            else:
                yield w.ia3_l
        yield from self.parameters()

    def set_enabled(self, enabled: bool) -> None:
        """Switch this adapter on or off; off restores its layers' base computation."""
        if not enabled:
            self.unmerge()
        for w in self._wrappers:
            w.enabled = enabled
        if self._prefix_hook is not None:
            self._prefix_hook.enabled = enabled
        self.enabled = enabled

    def enable(self) -> None:
        self.set_enabled(True)

    def disable(self) -> None:
        self.set_enabled(False)

    def _check_mergeable(self) -> None:
        if not self._wrappers:
            raise ValueError(
                f"eefast: a {self.method} adapter cannot be merged into the weights "
                "(only LoRA and (IA)³ can)"
            )

    def merge(self) -> None:
        """Fold the adapter into its layers' weights (LoRA and (IA)³ only)."""
        self._check_mergeable()
        if not self.enabled:
            raise ValueError(f"eefast: adapter {self.name!r} is disabled; enable it to merge")
        for w in self._wrappers:
            w.merge()

    def unmerge(self) -> None:
        for w in self._wrappers:
            w.unmerge()

    @property
    def merged(self) -> bool:
        return any(w.merged for w in self._wrappers)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, method={self.method}, targets={len(self.targets)}"


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """The adapters added to ``model``, by name."""
    registry = getattr(model, "eefast_adapters", None)
    return dict(registry.items()) if registry is not None else {}


def get_adapter(model: nn.Module, name: str = "default") -> Adapter:
    """The adapter called ``name``; a clear error naming the ones the model has."""
    found = adapters(model)
    if name not in found:
        raise ValueError(f"eefast: no adapter named {name!r}; the model has {sorted(found)}")
    return found[name]


def add_adapters(model: nn.Module, config: AdapterConfig, name: str = "default") -> Adapter:
    """Add one adapter (any method) to a causal LM and return it. The base model is not
    frozen here: call :func:`mark_only_adapters_trainable` before training."""
    if not isinstance(
        config, LoraConfig | SeriesConfig | ParallelConfig | PrefixConfig | IA3Config
    ):
        raise TypeError(f"eefast: expected an adapter config, got {type(config).__name__}")
    if name in adapters(model):
        raise ValueError(f"eefast: the model already has an adapter named {name!r}")
    config.validate(_hidden_size(model))
    adapter = Adapter(name, config)
    attach = {
        "lora": _attach_lora,
        "ia3": _attach_ia3,
        "series": _attach_series,
        "parallel": _attach_parallel,
        "prefix": _attach_prefix,
    }[config.method]
    attach(model, adapter)
    p = next(model.parameters())
    adapter.to(device=p.device)
    if not hasattr(model, "eefast_adapters"):
        model.eefast_adapters = nn.ModuleDict()
    model.eefast_adapters[name] = adapter
    return adapter


def remove_adapter(model: nn.Module, name: str = "default") -> None:
    """Take an adapter off the model: unmerged, unhooked, original linears put back."""
    adapter = get_adapter(model, name)
    adapter.unmerge()
    for path, handle in adapter._handles:
        handle.remove()
        # The module may have been replaced since (a LoRA wrapper takes over its hooks): drop
        # the hook from whichever module is at the path now. Hook ids are globally unique.
        module = model.get_submodule(path)
        for hooks in (
            module._forward_hooks,
            module._forward_hooks_with_kwargs,
            module._forward_pre_hooks,
            module._forward_pre_hooks_with_kwargs,
        ):
            hooks.pop(handle.id, None)
    for path, original in adapter._originals:
        replace_module(model, path, original)
    if name in model.eefast_adapters:
        del model.eefast_adapters[name]


def mark_only_adapters_trainable(model: nn.Module) -> int:
    """Freeze every parameter except the adapters'; returns the trainable parameter count."""
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    for adapter in adapters(model).values():
        for p in adapter.trainable_parameters():
            p.requires_grad_(True)
            count += p.numel()
    if count == 0:
        raise ValueError("eefast: the model has no adapters; call add_adapters first")
    return count


def _attach_lora(model: nn.Module, adapter: Adapter) -> None:
    cfg: LoraConfig = adapter.config
    targets = cfg.target_modules or default_targets(model, "lora").lora
    for path in find_targets(model, targets, "lora"):
        original = model.get_submodule(path)
        wrapper = LoRALinear.from_linear(original, cfg.r, cfg.alpha, cfg.dropout)
        replace_module(model, path, wrapper)
        adapter._originals.append((path, original))
        adapter._wrappers.append(wrapper)
        adapter.targets.append(path)


def _attach_ia3(model: nn.Module, adapter: Adapter) -> None:
    cfg: IA3Config = adapter.config
    if cfg.target_modules is None:
        spec = default_targets(model, "ia3")
        targets, feedforward = spec.ia3, spec.ia3_feedforward
    else:
        targets, feedforward = cfg.target_modules, cfg.feedforward_modules
    for path in find_targets(model, targets, "ia3"):
        ff = any(matches(path, f) for f in feedforward)
        original = model.get_submodule(path)
        wrapper = IA3Linear(original, feedforward=ff)
        replace_module(model, path, wrapper)
        adapter._originals.append((path, original))
        adapter._wrappers.append(wrapper)
        adapter.targets.append(path)


def _new_bottleneck(cfg: BottleneckConfig, in_f: int, out_f: int, like: torch.Tensor):
    return BottleneckAdapter(
        in_f,
        out_f,
        cfg.bottleneck_size,
        cfg.activation,
        cfg.scaling,
        cfg.init,
        cfg.dropout,
        device=like.device,
        dtype=like.dtype,
    )


def _module_features(model: nn.Module, path: str) -> tuple[int, int]:
    """(in, out) features of a linear (or wrapped linear); a block-level module maps the
    hidden size to itself."""
    module = model.get_submodule(path)
    if isinstance(module, ADAPTED_LINEARS):
        return module.in_features, module.out_features
    if is_linear(module):
        return linear_features(module)
    hidden = _hidden_size(model)
    return hidden, hidden


def _attach_series(model: nn.Module, adapter: Adapter) -> None:
    cfg: SeriesConfig = adapter.config
    if cfg.target_modules is None:
        spec = default_targets(model, "series")
        targets = (spec.mlp_out,) if cfg.placement == "pfeiffer" else (spec.attn_out, spec.mlp_out)
    else:
        targets = cfg.target_modules
    like = next(model.parameters())
    for path in find_targets(model, targets, "series", linear_only=False):
        _, out_f = _module_features(model, path)
        module = _new_bottleneck(cfg, out_f, out_f, like)
        adapter.bottlenecks[_key(path)] = module

        def hook(_mod, _args, output, module=module):
            if not adapter.enabled:
                return output
            return _with_first(output, module(_first(output)))

        adapter._handles.append((path, model.get_submodule(path).register_forward_hook(hook)))
        adapter.targets.append(path)


def _attach_parallel(model: nn.Module, adapter: Adapter) -> None:
    cfg: ParallelConfig = adapter.config
    if cfg.target_modules is None:
        spec = default_targets(model, "parallel")
        pairs = list(
            zip(
                find_targets(model, (spec.mlp_in,), "parallel", linear_only=False),
                find_targets(model, (spec.mlp,), "parallel", linear_only=False),
                strict=True,
            )
        )
    else:
        pairs = [(p, p) for p in find_targets(model, cfg.target_modules, "parallel", False)]
    like = next(model.parameters())
    for in_path, out_path in pairs:
        in_f, _ = _module_features(model, in_path)
        _, out_f = _module_features(model, out_path)
        module = _new_bottleneck(cfg, in_f, out_f, like)
        adapter.bottlenecks[_key(out_path)] = module
        stash: dict[str, torch.Tensor] = {}

        def save_input(_mod, args, kwargs, stash=stash):
            stash["x"] = args[0] if args else kwargs["hidden_states"]

        def add_beside(_mod, _args, output, module=module, stash=stash):
            x = stash.pop("x")
            if not adapter.enabled:
                return output
            return _with_first(output, module(x, _first(output)))

        in_module, out_module = model.get_submodule(in_path), model.get_submodule(out_path)
        adapter._handles.append(
            (in_path, in_module.register_forward_pre_hook(save_input, with_kwargs=True))
        )
        adapter._handles.append((out_path, out_module.register_forward_hook(add_beside)))
        adapter.targets.append(out_path)


def _attach_prefix(model: nn.Module, adapter: Adapter) -> None:
    # The hook sits on the decoder stack, so the causal LM's forward, generate() and eefast's
    # fused-loss path (which calls the stack directly) all see it.
    decoder = decoder_stack(model)
    check_prefix_support(decoder)
    if any(a.method == "prefix" for a in adapters(model).values()):
        raise ValueError("eefast: the model already has a prefix adapter; one prefix per model")
    like = next(model.parameters())
    adapter.prefix = PrefixEncoder(adapter.config, model.config, like.device, like.dtype)
    hook = PrefixHook(adapter.prefix, decoder)
    adapter.__dict__["_prefix_hook"] = hook
    path = "" if decoder is model else next(n for n, m in model.named_modules() if m is decoder)
    adapter._handles.append((path, decoder.register_forward_pre_hook(hook, with_kwargs=True)))
    adapter.targets.append(path)

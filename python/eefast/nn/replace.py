"""Swapping one submodule of a model for another, by its dotted path."""

from __future__ import annotations

from torch import nn


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` inside ``root``, keeping the hooks registered on the module it
    replaces."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, child)
    new._forward_hooks.update(old._forward_hooks)
    new._forward_hooks_with_kwargs.update(old._forward_hooks_with_kwargs)
    new._forward_pre_hooks.update(old._forward_pre_hooks)
    new._forward_pre_hooks_with_kwargs.update(old._forward_pre_hooks_with_kwargs)
    setattr(parent, child, new)

"""Adapter files. LoRA and (IA)³ use PEFT's layout (``adapter_config.json`` +
``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight`` /
``.ia3_l``), so ``peft.PeftModel.from_pretrained`` loads them and eefast loads PEFT's. Series,
parallel and prefix adapters, which PEFT lacks, use ``eefast_adapter.json`` plus the same
safetensors file with the adapter module's own state-dict keys. Every file is written
atomically.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..io import write_json, write_safetensors
from .config import IA3Config, LoraConfig, config_from_dict, config_to_dict
from .model import Adapter, add_adapters, get_adapter, remove_adapter
from .targets import default_targets

PEFT_CONFIG = "adapter_config.json"
EEFAST_CONFIG = "eefast_adapter.json"
WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _peft_config(model: nn.Module, adapter: Adapter) -> dict:
    cfg = adapter.config
    fan_in_fan_out = any(w.fan_in_fan_out for w in adapter._wrappers)
    common = {
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": None,
        "revision": None,
    }
    if isinstance(cfg, LoraConfig):
        targets = cfg.target_modules or default_targets(model, "lora").lora
        return {
            **common,
            "peft_type": "LORA",
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": sorted(targets),
            "bias": "none",
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
        }
    spec = None if cfg.target_modules is not None else default_targets(model, "ia3")
    return {
        **common,
        "peft_type": "IA3",
        "target_modules": sorted(cfg.target_modules or spec.ia3),
        "feedforward_modules": sorted(cfg.feedforward_modules or spec.ia3_feedforward),
        "init_ia3_weights": True,
    }


def _peft_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    tensors = {}
    for path, w in zip(adapter.targets, adapter._wrappers, strict=True):
        if adapter.method == "lora":
            tensors[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = w.lora_a
            tensors[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = w.lora_b
        else:
            tensors[f"{_PEFT_PREFIX}{path}.ia3_l"] = w.ia3_l
    return tensors


def save_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> Path:
    """Write one adapter to ``directory`` (PEFT's format for LoRA and (IA)³)."""
    adapter = get_adapter(model, name)
    directory = Path(directory)
    if adapter.method in ("lora", "ia3"):
        if adapter.merged:
            raise ValueError(f"eefast: adapter {name!r} is merged; unmerge it before saving")
        write_safetensors(directory / WEIGHTS, _peft_tensors(adapter), {"format": "pt"})
        write_json(directory / PEFT_CONFIG, _peft_config(model, adapter))
    else:
        write_safetensors(directory / WEIGHTS, adapter.state_dict(), {"format": "pt"})
        write_json(
            directory / EEFAST_CONFIG,
            {
                "format": "eefast-adapter",
                "version": 1,
                "model_type": model.config.model_type,
                "base_model_name_or_path": getattr(model.config, "_name_or_path", None),
                "config": config_to_dict(adapter.config),
            },
        )
    return directory


def _config_from_peft(data: dict, directory: Path) -> LoraConfig | IA3Config:
    kind = data.get("peft_type")
    targets = data.get("target_modules")
    if isinstance(targets, str):
        raise ValueError(
            f"eefast: {directory} targets modules by pattern ({targets!r}); eefast loads PEFT "
            "adapters whose target_modules is a list of names"
        )
    if kind == "LORA":
        unsupported = [
            key
            for key in (
                "use_dora",
                "use_rslora",
                "lora_bias",
                "rank_pattern",
                "alpha_pattern",
                "layers_to_transform",
                "modules_to_save",
            )
            if data.get(key)
        ]
        if unsupported:
            raise ValueError(f"eefast: {directory} uses LoRA options eefast lacks: {unsupported}")
        if not isinstance(data.get("r"), int) or isinstance(data.get("r"), bool):
            raise ValueError(f"eefast: {directory}: r must be an integer, got {data.get('r')!r}")
        return LoraConfig(
            r=data["r"],
            alpha=float(data["lora_alpha"]),
            dropout=float(data.get("lora_dropout", 0.0)),
            target_modules=tuple(targets),
        )
    if kind == "IA3":
        if data.get("modules_to_save"):
            raise ValueError(f"eefast: {directory} uses modules_to_save, which eefast lacks")
        return IA3Config(
            target_modules=tuple(targets), feedforward_modules=tuple(data["feedforward_modules"])
        )
    raise ValueError(
        f"eefast: {directory} holds a PEFT {kind} adapter; eefast loads PEFT's LORA and IA3"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"eefast: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"eefast: {path} must hold a JSON object")
    return data


def _warn_other_base(directory: Path, base: str | None, model: nn.Module) -> None:
    mine = getattr(model.config, "_name_or_path", None)
    if base and mine and Path(str(base)).name != Path(str(mine)).name:
        warnings.warn(
            f"eefast: the adapter in {directory} was trained on {base!r}; loading it into {mine!r}",
            stacklevel=3,
        )


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> Adapter:
    """Add the adapter saved in ``directory`` (by eefast or by PEFT) to ``model``."""
    directory = Path(directory)
    if (directory / PEFT_CONFIG).is_file():
        data = _read_json(directory / PEFT_CONFIG)
        config = _config_from_peft(data, directory)
        _warn_other_base(directory, data.get("base_model_name_or_path"), model)
        peft = True
    elif (directory / EEFAST_CONFIG).is_file():
        meta = _read_json(directory / EEFAST_CONFIG)
        if meta.get("model_type") != model.config.model_type:
            raise ValueError(
                f"eefast: {directory} was saved from a {meta.get('model_type')} model, "
                f"not {model.config.model_type}"
            )
        config = config_from_dict(meta["config"])
        peft = False
    else:
        raise FileNotFoundError(f"eefast: no {PEFT_CONFIG} or {EEFAST_CONFIG} in {directory}")
    if not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"eefast: {directory / WEIGHTS} is missing")
    try:
        tensors = load_file(directory / WEIGHTS)
    except Exception as e:  # safetensors raises its own error type for a corrupt file
        raise ValueError(
            f"eefast: {directory / WEIGHTS} is not a readable safetensors file ({e})"
        ) from None
    adapter = add_adapters(model, config, name)
    try:
        own = _peft_tensors(adapter) if peft else adapter.state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"eefast: {directory / WEIGHTS} does not fit this model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for key, target in own.items():
                if tensors[key].shape != target.shape:
                    raise ValueError(
                        f"eefast: {key} has shape {tuple(tensors[key].shape)} in the file but "
                        f"{tuple(target.shape)} in the model"
                    )
                target.copy_(tensors[key])
    except BaseException:
        remove_adapter(model, name)
        raise
    return adapter

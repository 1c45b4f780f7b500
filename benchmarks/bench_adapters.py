"""Adapter training steps on SmolLM2: eefast against HF PEFT 0.21 on the same model and data.

Each provider gets its own copy of the model with the same adapter (same method, targets and
hyper-parameters), and runs forward + causal-LM loss + backward + an AdamW step on the adapter
parameters, on the same token block: PEFT through `model(labels=...)`, eefast through the loss
its `finetune` uses (the decoder stack + the fused `linear_cross_entropy`). Series and parallel
adapters have no PEFT counterpart; their op is compared with eager and torch.compile in
`ops --op bottleneck_adapter`.
"""

from __future__ import annotations

import copy
import warnings

import torch

from eefast.adapters import IA3Config, LoraConfig, PrefixConfig, add_adapters
from eefast.adapters import mark_only_adapters_trainable as eefast_freeze
from eefast.data import load_documents, token_blocks
from eefast.hf import load_model
from eefast.timing import time_median
from eefast.train import causal_lm_loss

from .common import Row, peak_extra_memory_mib

PROVIDERS = ["eefast", "peft"]
METHODS = ["lora", "ia3", "prefix"]


def _eefast(model, method: str):
    config = {
        "lora": LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
        "ia3": IA3Config(),
        "prefix": PrefixConfig(num_virtual_tokens=16),
    }[method]
    add_adapters(model, config)
    eefast_freeze(model)
    return model


def _peft(model, method: str):
    import peft

    config = {
        "lora": peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "ia3": peft.IA3Config(task_type="CAUSAL_LM"),
        "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
    }[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def run(
    methods, batch_size: int, seq_len: int, providers, budget_s: float = 10.0, dtype=torch.float32
) -> list[Row]:
    base, tokenizer = load_model(dtype=dtype)
    base.to(torch.get_default_device())
    ids = token_blocks(tokenizer, load_documents(), seq_len)[:batch_size].to(base.device)
    rows = []
    for method in methods:
        case = {
            "model": "SmolLM2-135M",
            "method": method,
            "tokens": ids.numel(),
            "dtype": str(dtype).removeprefix("torch."),
        }
        for provider in providers:
            model = (_eefast if provider == "eefast" else _peft)(copy.deepcopy(base), method)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-5)

            def step(model=model, opt=opt, fused=provider == "eefast"):
                opt.zero_grad(set_to_none=True)
                if fused:
                    loss = causal_lm_loss(model, ids, None, ids)
                else:
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()

            seconds, _ = time_median(step, min_reps=3, budget_s=budget_s)
            peak = peak_extra_memory_mib(step)
            n_params = sum(p.numel() for p in params)
            rows.append(
                Row("adapter_step", case, provider, seconds * 1e3, peak, {"params": n_params})
            )
            print(
                f"  {case} {provider:<7} {seconds * 1e3:9.1f} ms  peak {peak} MiB  "
                f"trainable {n_params:,}",
                flush=True,
            )
            del model, opt
    return rows

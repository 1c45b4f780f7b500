"""HF Trainer LoRA SFT on SmolLM2, unpatched against ``eefast.patch``: the same PEFT model,
data, seed and arguments; time per step, peak extra memory, and the loss curves (which must
agree). Both providers run in this process, one after the other."""

from __future__ import annotations

import copy
import time
import warnings

import peft
import torch
import transformers as T

import eefast
from eefast.data import load_documents, token_blocks
from eefast.hf import load_model

from .common import Row, peak_extra_memory_mib

PROVIDERS = ["eefast", "hf"]


def _trainer(base, rows, steps: int, batch_size: int, out: str) -> T.Trainer:
    torch.manual_seed(0)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                             task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base), config)
    args = T.TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps,
        learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True,
    )  # fmt: skip
    return T.Trainer(model=model, args=args, train_dataset=rows)


def run(steps: int, batch_size: int, seq_len: int, providers, out: str) -> list[Row]:
    base, tokenizer = load_model()
    blocks = token_blocks(tokenizer, load_documents(), seq_len)[: steps * batch_size]
    rows = [{"input_ids": b, "labels": b} for b in blocks]
    case = {"model": "SmolLM2-135M", "adapter": "LoRA r=8 q,v", "steps": steps,
            "tokens_per_step": batch_size * seq_len, "dtype": "float32"}  # fmt: skip
    results, curves = [], {}
    for provider in providers:
        trainer = _trainer(base, rows, steps, batch_size, f"{out}/trainer-{provider}")
        if provider == "eefast":
            eefast.patch(trainer.model)
        seconds = []

        def train(trainer=trainer, seconds=seconds):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.train()
            seconds.append(time.perf_counter() - t0)

        peak = peak_extra_memory_mib(train)
        curves[provider] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        ms = seconds[0] / steps * 1e3
        results.append(Row("trainer_lora_sft", case, provider, ms, peak,
                           {"loss_first": curves[provider][0],
                            "loss_last": curves[provider][-1]}))  # fmt: skip
        print(f"  {provider:<7} {ms:8.1f} ms/step  peak {peak} MiB  loss "
              f"{curves[provider][0]:.4f} -> {curves[provider][-1]:.4f}", flush=True)  # fmt: skip
        del trainer
    if len(curves) == 2:
        a, b = curves.values()
        worst = max(abs(x - y) / max(abs(y), 1e-9) for x, y in zip(a, b, strict=True))
        print(f"  loss curves agree within {worst:.1e} (relative)")
    return results

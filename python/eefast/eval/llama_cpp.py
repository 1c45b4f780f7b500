"""llama.cpp as a decoding provider for the benchmarks (``eefast bench-generate --gguf``,
``python -m benchmarks lowbit``), through ``llama-cpp-python``, an optional dependency:
greedy tokens of one token-id prompt and the seconds they took, prompt included."""

from __future__ import annotations

import time
from pathlib import Path


class LlamaCpp:
    """A GGUF file loaded by llama.cpp with ``threads`` threads."""

    def __init__(self, gguf: str | Path, threads: int, n_ctx: int = 2048):
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise ImportError(
                "a llama.cpp provider needs llama-cpp-python: pip install llama-cpp-python"
            ) from e
        if not Path(gguf).is_file():
            raise FileNotFoundError(f"llama.cpp provider: no GGUF file {gguf}")
        self.name = f"llama.cpp {Path(gguf).name}"
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, verbose=False)

    def greedy(self, ids: list[int], max_new: int, eos: int | None = None):
        """(new tokens, seconds): up to ``max_new`` greedy tokens, stopping after ``eos``."""
        out, t0 = [], time.perf_counter()
        for tok in self.llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(tok)
            if len(out) == max_new or tok == eos:
                break
        return out, time.perf_counter() - t0

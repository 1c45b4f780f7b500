"""Tiny random Hugging Face causal LMs (hidden 64, 4 blocks) of every supported architecture."""

import torch
import transformers as T

VOCAB = 96


def _configs():
    common = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    llama = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    return {
        "llama": T.LlamaConfig(**llama, **common),
        "mistral": T.MistralConfig(**llama, **common),
        "qwen2": T.Qwen2Config(**llama, **common),
        "gpt2": T.GPT2Config(n_embd=64, n_layer=4, n_head=4, **common),
        "opt": T.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            **common,
        ),
        "gpt_neox": T.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            **common,
        ),
        "bloom": T.BloomConfig(hidden_size=64, n_layer=4, n_head=4, **common),
        "gptj": T.GPTJConfig(n_embd=64, n_layer=4, n_head=4, rotary_dim=8, **common),
    }


ARCH_NAMES = list(_configs())


def tiny_model(arch: str = "llama", seed: int = 0, **config):
    """A tiny random model of ``arch``; ``config`` overrides its config's fields."""
    torch.manual_seed(seed)
    cfg = _configs()[arch]
    cfg.update(config)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # Random init leaves norms at identity; perturb them so copied norms are tested for real.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def token_batch(batch: int = 2, seq: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))

"""Pure-torch references of every eefast op: the oracles the tests compare against, and
the eager baselines of the benchmarks. Each takes the op's arguments and computes through
full fp32 (or the input dtype's) tensors, with no fusion."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .bottleneck import ADAPTER_ACTIVATIONS
from .confidence import ExitStats


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unfused pure-torch ``lora_linear`` (the test oracle); ``x_lora`` stands for dropout(x)."""
    x_lora = x if x_lora is None else x_lora
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_lora, lora_a), lora_b)


def bottleneck_adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    scale: float | torch.Tensor,
    activation: str = "relu",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unfused pure-torch ``bottleneck_adapter`` (the test oracle and the eager baseline)."""
    residual = x if residual is None else residual
    hidden = ADAPTER_ACTIVATIONS[activation](F.linear(x, down_weight, down_bias))
    return residual + scale * F.linear(hidden, up_weight, up_bias)


def exit_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> ExitStats:
    """Pure-torch ``exit_stats`` through full fp32 logits (the test oracle)."""
    b = None if bias is None else bias.float()
    logits = F.linear(hidden.float(), weight.float(), b) / temperature
    lse = logits.logsumexp(-1)
    logp = logits - lse.unsqueeze(-1)
    top = logits.topk(min(2, logits.shape[-1]), dim=-1).values
    p1 = (top[..., 0] - lse).exp()
    p2 = (top[..., 1] - lse).exp() if top.shape[-1] > 1 else torch.zeros_like(p1)
    entropy = -(logp.exp() * logp).sum(-1)
    return ExitStats(lse, p1, logits.argmax(-1), entropy, p1 - p2)


def linear_cross_entropy(
    hidden,
    weight,
    targets,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    z_loss=0.0,
    teacher=None,
    kd_weight=0.0,
    label_smoothing=0.0,
    softcap=0.0,
    class_weight=None,
    return_lse=False,
):
    """Pure-torch ``linear_cross_entropy`` through full fp32 logits (the test oracle): torch's
    ``cross_entropy`` (weights, label smoothing) on the (soft-capped) logits, plus the z-loss
    and KD terms; a weighted mean divides by the valid targets' weights, as torch's does."""
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    logits = logits.reshape(-1, logits.shape[-1])
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    targets = targets.reshape(-1)
    valid = targets != ignore_index
    w = None if class_weight is None else class_weight.float()
    loss = F.cross_entropy(logits, targets, weight=w, ignore_index=ignore_index,
                           reduction="none", label_smoothing=label_smoothing)  # fmt: skip
    lse = logits.logsumexp(-1)
    loss = loss + z_loss * lse.square()
    if teacher is not None:
        t_logits = F.linear(teacher[0].float(), teacher[1].float()).reshape(logits.shape)
        log_pt = t_logits.log_softmax(-1)
        loss = loss + kd_weight * (log_pt.exp() * (log_pt - logits.log_softmax(-1))).sum(-1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        out = loss.reshape(hidden.shape[:-1])
    elif reduction == "sum":
        out = loss.sum()
    else:
        weights = valid.float() if w is None else w[targets.clamp(min=0)] * valid
        total = weights.sum()
        out = loss.sum() / torch.where(total > 0, total, torch.ones_like(total))
    lse = torch.where(valid, lse, torch.zeros_like(lse))  # 0 where ignored, as the op
    return (out, lse.reshape(hidden.shape[:-1])) if return_lse else out


def decode_linear_q8(x, qweight, scales, bias=None) -> torch.Tensor:
    """Dequantise, then ``F.linear`` (float32 math, x's dtype out)."""
    w = qweight.float() * scales.float()[:, None]
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x with each group of 32 rounded as ``decode_linear_gguf``'s kernel multiplies it:
    int8 steps of max|x| / 127 (ties to even), in float32."""
    g = x.float().reshape(*x.shape[:-1], -1, 32)
    d = g.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(g * inv) * d).reshape(x.shape)


def decode_linear_gguf(x, qweight, bias=None) -> torch.Tensor:
    """What ``decode_linear_gguf`` computes, in float64 (x's dtype out): up to 64 rows (its
    kernel) quantise the activations per group of 32; more multiply them as they are. Both
    times the exactly dequantised blocks."""
    from .gguf import dequantize_gguf

    w = dequantize_gguf(qweight).double()
    rows = x.numel() // max(1, x.shape[-1])
    xq = quantize_activations(x) if 0 < rows <= 64 else x.float()
    y = F.linear(xq.double(), w, None if bias is None else bias.double())
    return y.to(x.dtype)


def decode_block(h, cos, sin, allowed, k_cache, v_cache, cache_len, norms, weights,
                           biases, eps, scaling, scales=None) -> torch.Tensor:  # fmt: skip
    """Pure-torch ``decode_block`` in float32 (the test oracle); writes the caches too. With
    ``scales``, the weights are int8 and dequantised first; uint8 weights are GGUF blocks,
    multiplied as ``decode_linear_gguf``'s kernel does."""
    if scales:
        weights = [w.float() * s.float()[:, None] for w, s in zip(weights, scales, strict=True)]

    def rms(x, w):
        return w.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def lin(x, i):
        b = biases[i]
        if weights[i].dtype == torch.uint8:
            return decode_linear_gguf(x, weights[i], b).float()
        return F.linear(x, weights[i].float(), None if b is None else b.float())

    def rotate(x):  # [B, n, q, hd]
        half = x.shape[-1] // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos.float()[:, None] + turned * sin.float()[:, None]

    batch, q, _ = h.shape
    hd = k_cache.shape[-1]
    x = rms(h.float(), norms[0])
    query, key, value = (lin(x, i).view(batch, q, -1, hd).transpose(1, 2) for i in range(3))
    k_cache[:, :, cache_len : cache_len + q] = rotate(key).to(k_cache.dtype)
    v_cache[:, :, cache_len : cache_len + q] = value.to(v_cache.dtype)
    group = query.shape[1] // k_cache.shape[1]
    keys = k_cache[:, :, : cache_len + q].float().repeat_interleave(group, 1)
    values = v_cache[:, :, : cache_len + q].float().repeat_interleave(group, 1)
    scores = (rotate(query) @ keys.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = scores.softmax(-1).masked_fill(~allowed[:, None], 0.0)
    h_mid = h.float() + lin((probs @ values).transpose(1, 2).reshape(batch, q, -1), 3)
    x = rms(h_mid, norms[1])
    return (h_mid + lin(F.silu(lin(x, 4)) * lin(x, 5), 6)).to(h.dtype)

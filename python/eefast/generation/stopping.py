"""When a sequence stops: at EOS, or once its text holds a stop string."""

from __future__ import annotations


def stop_checker(tokenizer, stop: list[str] | None):
    """tokens -> whether the decoded text of the last few tokens holds a stop string. A token
    decodes to at least part of one character, so the tail that can hold the longest stop
    string, plus a token it may straddle, is enough: checking costs O(1) per token."""
    if not stop:
        return None
    if tokenizer is None:
        raise ValueError("eefast.generate: stop strings need a tokenizer")
    if any(not s for s in stop):
        raise ValueError("eefast.generate: stop strings must not be empty")
    tail = 4 * max(len(s) for s in stop) + 2

    def stopped(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens[-tail:], skip_special_tokens=True)
        return any(s in text for s in stop)

    return stopped


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    cuts = [text.find(s) for s in stop or () if s in text]
    return text[: min(cuts)] if cuts else text


def eos_ids(tokenizer, stop_at_eos: bool) -> set[int]:
    if not stop_at_eos or tokenizer is None:
        return set()
    eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())

"""The three decoding loops over a DecodeState: full depth, self-speculative and threshold.

Every loop keeps only unfinished sequences in the batch: a sequence that emits EOS or reaches
its token budget is dropped from the cache (rows are selected away), so batch > 1 never pays
for finished rows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache import DecodeState
from .runner import Runner
from .sampling import Sampling

CONFIDENCE_MEASURES = ("max_prob", "margin", "entropy", "classifier")
KV_MODES = ("recompute", "propagate")


@dataclass
class DecodeStats:
    """What a decoding loop did, summed over the batch."""

    tokens: int = 0  # tokens emitted
    rounds: int = 0  # draft/verify rounds (speculative) or decode steps
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    candidates_accepted: int = 0  # of those, a draft tree's other candidates (feature_draft)
    verify_rows: int = 0  # rows the verifier scored (x0, drafts and candidates)
    exit_layers: Counter = field(default_factory=Counter)  # layer a token was decided at
    block_calls: int = 0  # block weight passes after the prefill (one per block per call)
    head_calls: float = 0.0  # LM-head weight passes after the prefill (a draft-vocabulary
    # exit head counts as its share of the vocabulary)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per verify round (accepted drafts + the verifier's own)."""
        return self.tokens / self.rounds if self.rounds else 0.0


class Outputs:
    """Per-sequence emitted tokens, EOS and budget handling, and the map from batch rows to
    the caller's sequences."""

    def __init__(
        self,
        batch: int,
        max_new_tokens: int,
        eos_ids: set[int],
        stopped: Callable[[list[int]], bool] | None = None,
    ):
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.layers: list[list[int]] = [[] for _ in range(batch)]  # layer each was decided at
        self.rows = list(range(batch))  # batch row -> sequence index
        self.max_new = max_new_tokens
        self.eos = eos_ids
        self.stopped = stopped  # tokens so far -> whether a stop string has appeared

    def emit(self, row: int, new: list[int], layers: list[int]) -> tuple[int, bool]:
        """Append tokens (decided at these layers) to a row's sequence, up to EOS or the
        budget: (kept, finished)."""
        out, out_layers = self.tokens[self.rows[row]], self.layers[self.rows[row]]
        kept = 0
        for t, layer in zip(new, layers, strict=True):
            if len(out) >= self.max_new:
                return kept, True
            out.append(t)
            out_layers.append(layer)
            kept += 1
            if t in self.eos or (self.stopped is not None and self.stopped(out)):
                return kept, True
        return kept, len(out) >= self.max_new

    def drop(self, finished: list[bool], state: DecodeState, *tensors):
        """Remove finished rows from the batch, the state and the given [B, ...] tensors."""
        if not any(finished):
            return tensors
        keep = [i for i, f in enumerate(finished) if not f]
        self.rows = [self.rows[i] for i in keep]
        idx = torch.tensor(keep, dtype=torch.long, device=state.valid.device)
        state.select(idx)
        return tuple(t[idx] for t in tensors)


def prefill(runner: Runner, state: DecodeState, ids: torch.Tensor, valid: torch.Tensor):
    """Every layer over the left-padded prompts; the final logits of the last slot."""
    state.add_slots(valid)
    h = runner.run(runner.embed(ids, state), 0, runner.num_layers, state, fused=False)
    return runner.final_logits(h[:, -1])


def _step_all(runner: Runner, state: DecodeState, tok: torch.Tensor) -> torch.Tensor:
    state.add_slots(torch.ones(tok.shape[0], 1, dtype=torch.bool, device=tok.device))
    h = runner.run(runner.embed(tok[:, None], state), 0, runner.num_layers, state)
    return runner.final_logits(h[:, -1])


def _emit_each(out: Outputs, stats: DecodeStats, tok: torch.Tensor, layers) -> list[bool]:
    """One token per batch row, decided at layers[row]; which rows finished."""
    finished = []
    for row, layer in enumerate(layers):
        kept, done = out.emit(row, [int(tok[row])], [layer])
        stats.tokens += kept
        stats.exit_layers[layer] += kept
        finished.append(done)
    return finished


def decode_full(runner, state, logits, out: Outputs, sampling: Sampling, gen) -> DecodeStats:
    """Plain full-depth decoding: the reference every other mode is checked against."""
    stats = DecodeStats()
    L = runner.num_layers
    while out.rows:
        tok = sampling.pick(logits, gen)
        stats.rounds += 1
        (tok,) = out.drop(_emit_each(out, stats, tok, [L] * len(tok)), state, tok)
        if out.rows:
            logits = _step_all(runner, state, tok)
    return stats


@dataclass
class DraftLength:
    """Draft length: fixed, or adaptive (+2 after a fully accepted round, -1 otherwise)."""

    k: int
    adaptive: bool = True
    k_max: int = 7  # SmolLM2, q4 drafts: k_max 11 or 15 was no faster at batch 1, slower at 4

    def update(self, all_accepted: bool) -> None:
        if self.adaptive:
            self.k = min(self.k_max, self.k + 2) if all_accepted else max(1, self.k - 1)


def decode_speculative(
    runner: Runner,
    state: DecodeState,
    logits: torch.Tensor,
    out: Outputs,
    sampling: Sampling,
    gen,
    exits: list[int],
    draft: DraftLength,
    threshold: float = 0.0,
    measure: str = "max_prob",
) -> DecodeStats:
    """The exits draft, the full model verifies: lossless threshold mode.

    A draft token climbs the blocks like a token of threshold mode: it is drafted at the first
    exit in ``exits`` where every row's confidence reaches ``threshold`` (0: the first exit
    always drafts), and waits there with its hidden state. The round's last token is the first
    one no exit is confident about, or the one after ``draft.k`` drafts: it climbs to the top,
    and every waiting token joins it at its own layer (``_run_joining``), so one pass over the
    upper blocks computes their KV and the verifier's logits for all of them. The KV each draft
    left in the lower blocks is kept (an accepted draft's is exactly the full model's); rejected
    drafts become invalid slots, so each row accepts its own number of tokens.

    Greedy output equals full-depth greedy. Sampled drafts come from the exit's processed
    distribution q and are accepted with probability min(1, p/q), else resampled from
    norm(max(p - q, 0)), so output follows the full model's distribution; confidence there is
    q's top probability.
    """
    stats = DecodeStats()
    L = runner.num_layers
    decide = (
        _greedy_decider(runner, measure, threshold)
        if sampling.greedy
        else _sampling_decider(runner, sampling, gen, threshold)
    )
    x0 = sampling.pick(logits, gen)  # the prefill's token is emitted before any draft
    (x0,) = out.drop(_emit_each(out, stats, x0, [L] * len(x0)), state, x0)
    while out.rows:
        batch, device = x0.shape[0], x0.device
        start = state.slots
        tok, pending, drafts, draft_exits, q_probs = x0, [], [], [], []
        while True:
            state.add_slots(torch.ones(batch, 1, dtype=torch.bool, device=device))
            h, layer = runner.embed(tok[:, None], state), 0
            if len(drafts) == draft.k:
                break
            climb = _climb(runner, state, h, exits, pending, decide)
            h, layer = climb.h, climb.layer
            if not climb.all_decided:
                break
            pending.append((h, layer))
            tok = climb.token
            drafts.append(tok)
            draft_exits.append(climb.exit_at)
            q_probs.append(climb.q)
        m = len(drafts)
        h = _run_joining(runner, state, h, layer, L, pending)  # x0, d1..dm: [B, m + 1, d]
        d = torch.stack(drafts, 1) if m else x0.new_empty(batch, 0)
        exit_rows = torch.stack(draft_exits, 1).tolist() if m else [[] for _ in range(batch)]
        v = verify(out, stats, state, start, runner.final_logits(h), d, q_probs, sampling, gen,
                   L, exit_rows)  # fmt: skip
        draft.update(v.all_accepted)
        (x0,) = out.drop(v.finished, state, v.next_token)
        state.trim()
    return stats


@dataclass
class Verdict:
    """What one verify step decided, per batch row."""

    next_token: torch.Tensor  # [B] the verifier's token after the accepted drafts
    accepted: torch.Tensor  # [B] how many drafts each row accepted
    finished: list[bool]
    all_accepted: bool


def verify(
    out: Outputs,
    stats: DecodeStats,
    state: DecodeState,
    start: int,
    ver: torch.Tensor,
    drafts: torch.Tensor,
    q_probs: list,
    sampling: Sampling,
    gen,
    top: int,
    draft_layers: list[list[int]] | None = None,
) -> Verdict:
    """Accept each row's drafts against the verifier's logits ``ver`` [B, m + 1, V] over
    x0, d1..dm (slots ``start`` ..): greedy keeps the longest prefix equal to the verifier's
    argmaxes, sampled follows speculative sampling (``accept_sampled``). Emits the accepted
    drafts and the verifier's next token, counts them in ``stats`` (``draft_layers``: the
    layer each row's drafts were decided at; default ``top``, the verifier's) and marks the
    rejected drafts' slots invalid."""
    batch, m = drafts.shape
    if sampling.greedy:
        target = ver.argmax(-1)  # [B, m + 1]
    else:
        p = sampling.probs(ver)
    next_token = drafts.new_empty(batch)
    accepted = drafts.new_empty(batch)
    reject = torch.zeros(batch, m + 1, dtype=torch.bool, device=drafts.device)
    finished, all_accepted = [], True
    for row in range(batch):
        if sampling.greedy:
            n_acc = int((drafts[row] == target[row, :m]).long().cumprod(0).sum())
            nxt = int(target[row, n_acc])
        else:
            n_acc, nxt = accept_sampled(row, drafts, p, q_probs, gen)
        all_accepted &= n_acc == m
        reject[row, 1 + n_acc :] = True  # slot 0 is x0, slots 1..m the drafts
        layers = draft_layers[row][:n_acc] if draft_layers is not None else [top] * n_acc
        layers.append(top)
        kept, done = out.emit(row, drafts[row, :n_acc].tolist() + [nxt], layers)
        stats.tokens += kept
        stats.accepted += n_acc
        stats.exit_layers.update(layers[:kept])
        next_token[row], accepted[row] = nxt, n_acc
        finished.append(done)
    stats.rounds += 1
    stats.drafted += m * batch
    stats.verify_rows += (m + 1) * batch
    state.invalidate(reject, start)
    return Verdict(next_token, accepted, finished, all_accepted)


def accept_sampled(row, d, p, q_probs, gen) -> tuple[int, int]:
    """Speculative-sampling acceptance for one row: (accepted drafts, the next token)."""
    m = d.shape[1]
    for j in range(m):
        tok = int(d[row, j])
        pj, qj = p[row, j], q_probs[j][row]
        u = torch.rand((), generator=gen, device=pj.device)
        if u * qj[tok] <= pj[tok]:  # accept with probability min(1, p/q)
            continue
        resid = (pj - qj).clamp(min=0)
        resid = resid / resid.sum() if resid.sum() > 0 else pj
        return j, int(torch.multinomial(resid, 1, generator=gen))
    return m, int(torch.multinomial(p[row, m], 1, generator=gen))


def confidence(stats, measure: str, vocab: int) -> torch.Tensor:
    """A per-row confidence in [0, 1] from exit_stats outputs; exit when >= the threshold."""
    if measure == "max_prob":
        return stats.max_prob
    if measure == "margin":
        return stats.margin
    if measure == "entropy":
        return 1.0 - stats.entropy / math.log(vocab)
    raise ValueError(f"unknown confidence measure {measure!r}; choose from {CONFIDENCE_MEASURES}")


def decode_threshold(
    runner: Runner,
    state: DecodeState,
    logits: torch.Tensor,
    out: Outputs,
    exits: list[int],
    threshold: float,
    measure: str = "max_prob",
    kv: str = "recompute",
) -> DecodeStats:
    """Lossy early exit, greedy. A token leaves at the first active exit where every sequence
    of the batch is confident; a sequence confident at an earlier exit keeps its token from
    that exit. The skipped blocks still need the token's KV:

    * ``recompute`` (EE-LLM): exited tokens wait, with their hidden state, and join the next
      token that climbs past their exit, so each block computes their KV from the true hidden
      state, batched with that token. Exact KV, paid later; a run of exits defers the cost.
    * ``propagate`` (CALM): the exited hidden state is copied upward at once and each skipped
      block computes K/V from it (norm + two small projections per block). Cheaper, but those
      keys and values are approximations, which later tokens attend to.
    """
    stats = DecodeStats()
    L = runner.num_layers
    decide = _greedy_decider(runner, measure, threshold)
    pending: list[tuple[torch.Tensor, int]] = []  # (hidden [B, n, d], layer) per waiting group
    tok = logits.argmax(-1)
    exit_at = [L] * len(tok)  # the prefill's token is full depth
    while True:
        finished = _emit_each(out, stats, tok, exit_at)
        stats.rounds += 1
        tok, *groups = out.drop(finished, state, tok, *(g for g, _ in pending))
        pending = [(g, layer) for g, (_, layer) in zip(groups, pending, strict=True)]
        if not out.rows:
            return stats
        state.add_slots(torch.ones(tok.shape[0], 1, dtype=torch.bool, device=tok.device))
        climb = _climb(runner, state, runner.embed(tok[:, None], state), exits, pending, decide)
        if climb.all_decided:
            if kv == "propagate":
                runner.propagate_kv(climb.h, climb.layer, L, state)
            else:
                pending.append((climb.h, climb.layer))
            tok = climb.token
        else:
            h = _run_joining(runner, state, climb.h, climb.layer, L, pending)
            final = runner.final_logits(h[:, -1]).argmax(-1)
            tok = torch.where(climb.token >= 0, climb.token, final)
        exit_at = climb.exit_at.tolist()


@dataclass
class Climb:
    """Where a token's climb through the exits stopped."""

    h: torch.Tensor  # [B, q, d] hidden states at ``layer`` (waiting groups that joined first)
    layer: int
    token: torch.Tensor  # [B] the token each row's first confident exit picked; -1: none yet
    exit_at: torch.Tensor  # [B] the exit that picked it (num_layers where none did)
    q: torch.Tensor | None  # [B, V] the draft distribution each token was sampled from

    @property
    def all_decided(self) -> bool:
        return bool((self.token >= 0).all())


def _climb(runner, state, h, exits, pending, decide) -> Climb:
    """Blocks from 0 on h [B, 1, d] up through ``exits`` until every row has a confident exit
    (a row keeps the token of its first one); waiting groups join on the way. It stops at the
    exit where the last row became confident, or at the last exit."""
    batch, device = h.shape[0], h.device
    token = torch.full((batch,), -1, dtype=torch.long, device=device)
    exit_at = torch.full((batch,), runner.num_layers, dtype=torch.long, device=device)
    q, layer = None, 0
    for target in exits:
        h = _run_joining(runner, state, h, layer, target, pending)
        layer = target
        ready, tok, q_here = decide(target, h[:, -1])
        newly = ready & (token < 0)
        token = torch.where(newly, tok, token)
        exit_at = torch.where(newly, target, exit_at)
        if q_here is not None:
            q = q_here if q is None else torch.where(newly[:, None], q_here, q)
        if bool((token >= 0).all()):
            break
    return Climb(h, layer, token, exit_at, q)


def _greedy_decider(runner, measure, threshold):
    """(layer, h [B, d]) -> (rows confident at this exit, the exit's argmax, None). The
    classifier decides before the LM head, and a batch that is not confident skips the head."""

    def decide(layer, h):
        feat = runner.exit_hidden(layer, h)
        if measure == "classifier":
            ready = runner.ee.classifier(layer, feat) >= threshold
            if not bool(ready.any()):
                return ready, torch.zeros_like(ready, dtype=torch.long), None
            return ready, runner.exit_head_stats(layer, feat).argmax, None
        st = runner.exit_head_stats(layer, feat)
        vocab = runner.exit_vocab_size(layer)
        return confidence(st, measure, vocab) >= threshold, st.argmax, None

    return decide


def _sampling_decider(runner, sampling: Sampling, gen, threshold):
    """(layer, h [B, d]) -> (rows whose draft distribution's top probability reaches the
    threshold, a token sampled from it, the distribution)."""

    def decide(layer, h):
        q = sampling.probs(runner.exit_logits(layer, runner.exit_hidden(layer, h)))
        tok = torch.multinomial(q, 1, generator=gen).squeeze(-1)
        return q.amax(-1) >= threshold, tok, q

    return decide


def _run_joining(runner, state, h, start, end, pending) -> torch.Tensor:
    """Blocks [start, end) on h. A waiting group joins at its own layer. Groups wait at
    non-increasing layers in slot order, so the last one is the lowest and holds the slots just
    before h's (with ties, the last of them: popping from the end keeps slot order)."""
    layer = start
    while pending and start <= pending[-1][1] < end:
        group_h, group_layer = pending.pop()
        h = runner.run(h, layer, group_layer, state)
        h = torch.cat([group_h, h], 1)
        layer = group_layer
    return runner.run(h, layer, end, state)

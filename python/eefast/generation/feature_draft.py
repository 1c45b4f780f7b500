"""Lossless speculative decoding with a ``draft`` exit (EAGLE-style top-feature drafting).

The draft exit is one block on top of the model (``nn/exit_head.py``): from the model's top
feature of one token and the embedding of the next it predicts the next top feature, which the
shared LM head turns into a draft token, and which is fed back for the draft after it. So a
draft costs one block and a draft-vocabulary head, not a climb through the lower blocks.

A round, with the last emitted token x0 at slot S:

* draft: the draft layer runs on x0 (with the verifier's feature of the token before it) and
  then on its own drafts, one slot each, while some row's draft confidence is at or above the
  threshold, up to ``draft.k`` drafts (none: x0 climbs alone, a plain decoding step; a verify
  row costs about a third of a step here, so an unlikely draft is not worth verifying);
* verify: x0 and the drafts run through every block at once; each row accepts its own longest
  matching prefix (greedy) or follows speculative sampling, as in ``decode_speculative``;
* repair: the draft layer's slots after S were computed from predicted features; they are
  truncated and owed, and the next round's first draft call recomputes them from the
  verifier's real features, in the same block call as the new x0.

Rejected drafts become invalid slots, as in every mode, so rows accept different numbers of
tokens and positions never shift.
"""

from __future__ import annotations

import torch

from ..nn.exit_head import previous_features
from .cache import DecodeState
from .decode import DecodeStats, DraftLength, Outputs, _emit_each, verify
from .runner import Runner
from .sampling import Sampling


def prefill_with_draft(runner: Runner, state: DecodeState, ids, valid):
    """The model's blocks and the draft layer over the left-padded prompts: the final logits
    of the last slot and the top features [B, d] of that slot."""
    state.add_slots(valid)
    h = runner.run(runner.embed(ids, state), 0, runner.num_layers, state, fused=False)
    feats = runner.ee.parts.final_norm(h)
    x = _draft_inputs(runner, ids, previous_features(feats))
    runner.draft_features(x, state, fused=False)
    return runner.head_logits(feats[:, -1]), feats[:, -1]


def _draft_inputs(runner, tokens: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    return torch.cat([runner.token_embedding(tokens), prev], -1)


def decode_feature_draft(
    runner: Runner,
    state: DecodeState,
    logits: torch.Tensor,
    feats: torch.Tensor,
    out: Outputs,
    sampling: Sampling,
    gen,
    draft: DraftLength,
    threshold: float,
    width: int = 1,
    candidate_min: float = 0.0,
) -> DecodeStats:
    """Draft-exit speculative decoding after ``prefill_with_draft``; greedy output equals
    full-depth greedy, sampled output follows the full model's distribution.

    With ``width`` > 1 (greedy only) a round that drafts verifies a small tree: besides the
    first draft, the draft head's next ``width - 1`` likeliest tokens whose probability reaches
    ``candidate_min`` are candidates for the same position (``_Tree``)."""
    stats = DecodeStats()
    L = runner.num_layers
    x0 = sampling.pick(logits, gen)
    (x0, prev) = out.drop(_emit_each(out, stats, x0, [L] * len(x0)), state, x0, feats)
    d = prev.shape[-1]
    # The draft layer's owed slots (after its last true one): their tokens and the verifier's
    # features before them.
    owed_tok = x0.new_empty(len(x0), 0)
    owed_prev = prev.new_empty(len(x0), 0, d)
    while out.rows:
        batch, device = x0.shape[0], x0.device
        start = state.slots
        one = torch.ones(batch, 1, dtype=torch.bool, device=device)
        state.add_slots(one)
        toks = torch.cat([owed_tok, x0[:, None]], 1)
        f = runner.draft_features(
            _draft_inputs(runner, toks, torch.cat([owed_prev, prev[:, None]], 1)), state
        )[:, -1]
        top = runner.exit_top(L, f, width) if width > 1 else None
        drafts, q_probs = [], []
        while True:
            if top is not None and not drafts:  # the tree's first candidate
                tok, conf, q = top[1][:, 0], top[0][:, 0], None
            else:
                tok, conf, q = _draft_token(runner, f, sampling, gen)
            if not bool((conf >= threshold).any()):
                break
            drafts.append(tok)
            q_probs.append(q)
            state.add_slots(one)  # the draft's slot
            if len(drafts) == draft.k:
                break
            f = runner.draft_features(_draft_inputs(runner, tok[:, None], f[:, None]), state)[:, -1]
        m = len(drafts)
        dr = torch.stack(drafts, 1) if m else x0.new_empty(batch, 0)
        tree = _Tree.after_chain(state, top, candidate_min, m)
        rows = torch.cat([x0[:, None], dr, tree.tokens], 1)
        h = runner.run(runner.embed(rows, state), 0, L, state, sees=tree.sees)
        ver_feats = runner.ee.parts.final_norm(h)  # [B, 1 + m + candidates, d]
        ver = runner.head_logits(ver_feats)
        if tree.tokens.shape[1]:
            dr, ver, ver_feats = tree.take(runner, state, start, dr, ver, ver_feats, stats)
        v = verify(out, stats, state, start, ver, dr, q_probs, sampling, gen, L)
        if m:
            draft.update(v.all_accepted)
        # The draft layer keeps slot `start` (x0 with a real feature); slots after it owe a
        # recompute with the verifier's features.
        state.cache.lengths[L] = start + 1
        owed_tok, owed_prev = dr.clamp(min=0), ver_feats[:, :m]
        prev = ver_feats[torch.arange(batch, device=device), v.accepted]
        x0, owed_tok, owed_prev, prev = out.drop(
            v.finished, state, v.next_token, owed_tok, owed_prev, prev
        )
        state.trim()
        owed = state.slots - (start + 1)
        owed_tok, owed_prev = owed_tok[:, :owed], owed_prev[:, :owed]
    return stats


class _Tree:
    """The other candidates for the token after x0, beside the chain x0, c1, d2 .. dm.

    They take the slots after the chain, at c1's position, and each sees the cache, x0 and
    itself only (``sees``), so one verify pass scores the chain and every candidate. Where
    the verifier rejects c1 but picks a candidate, ``take`` moves that candidate's keys and
    values into c1's slot and hands ``verify`` a chain of one accepted draft, so the cache
    afterwards is exactly what a chain round would have left."""

    def __init__(self, tokens: torch.Tensor, sees: torch.Tensor | None):
        self.tokens = tokens  # [B, n] candidate tokens (n may be 0)
        self.sees = sees

    @classmethod
    def after_chain(cls, state: DecodeState, top, candidate_min: float, m: int) -> _Tree:
        batch = state.valid.shape[0]
        device = state.valid.device
        if top is None or m == 0:  # no chain, no tree: candidates follow a first draft
            return cls(torch.empty(batch, 0, dtype=torch.long, device=device), None)
        probs, ids = top[0][:, 1:], top[1][:, 1:]
        n = int((probs >= candidate_min).any(0).sum())  # probabilities are sorted
        if n == 0:
            return cls(ids[:, :0], None)
        c1 = state.slots - m
        state.add_slots(torch.ones(batch, n, dtype=torch.bool, device=device),
                        state.pos[:, c1 : c1 + 1].expand(batch, n))  # fmt: skip
        q = 1 + m + n
        sees = torch.ones(q, q, dtype=torch.bool, device=device).tril()
        sees[1 + m :, 1:] = torch.eye(q, dtype=torch.bool, device=device)[1 + m :, 1:]
        return cls(ids[:, :n], sees)

    def take(self, runner, state, start, dr, ver, ver_feats, stats):
        """Rows whose verifier rejects c1 but picks a candidate accept that candidate: its
        KV moves to c1's slot, and its verifier row and features replace c1's. Returns the
        chain view (drafts, logits, features) for ``verify``, which then marks every slot
        after the accepted ones invalid; the candidates' own slots are invalidated here."""
        m = dr.shape[1]
        first = ver[:, 0].argmax(-1)
        hit = (self.tokens == first[:, None]) & (dr[:, :1] != first[:, None])
        rows = hit.any(1).nonzero().squeeze(1)
        stats.verify_rows += self.tokens.numel()
        state.invalidate(torch.ones_like(self.tokens, dtype=torch.bool), start + 1 + m)
        if not len(rows):
            return dr, ver[:, : 1 + m], ver_feats[:, : 1 + m]
        col = hit[rows].long().argmax(1) + 1 + m  # the candidate's row in the verify pass
        state.cache.copy_slot(rows, start + col, start + 1, runner.num_layers)
        dr = dr.clone()
        dr[rows, 0] = self.tokens[rows, col - 1 - m]
        dr[rows, 1:] = -1  # nothing follows a candidate this round
        cand_ver, cand_feats = ver[rows, col], ver_feats[rows, col]
        ver, ver_feats = ver[:, : 1 + m].clone(), ver_feats[:, : 1 + m].clone()
        ver[rows, 1], ver_feats[rows, 1] = cand_ver, cand_feats
        stats.candidates_accepted += len(rows)
        return dr, ver, ver_feats


def _draft_token(runner: Runner, f: torch.Tensor, sampling: Sampling, gen):
    """(token, confidence, q or None) of the draft exit's head on predicted features f [B, d]."""
    layer = runner.num_layers
    if sampling.greedy:
        prob, tok = runner.exit_top(layer, f, 1)
        return tok[:, 0], prob[:, 0], None
    q = sampling.probs(runner.exit_logits(layer, f))
    return torch.multinomial(q, 1, generator=gen).squeeze(-1), q.amax(-1), q

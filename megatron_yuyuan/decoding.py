"""The next token of every row, chosen on the device, each row with its own settings.

Rows of one batch may differ in everything a :class:`~megatron_yuyuan.sampling.SamplingConfig`
holds: greedy or sampled, temperature, top-k, top-p, repetition penalty, no-repeat n-gram size and
seed. Penalties follow transformers' ``RepetitionPenaltyLogitsProcessor`` and
``NoRepeatNGramLogitsProcessor`` exactly (so greedy tokens equal ``transformers.generate``); each
sampled row draws from its own ``torch.Generator``, so a seeded row gives the same tokens whatever
it is batched with. Nothing here reads a tensor back to the host: the caller does that once per
step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_yuyuan.sampling import SamplingConfig


class RowSettings:
    """Per-row sampling values as device tensors ``[S]``, and each sampled row's generator.

    Args:
        slots: rows at most.
        device: where the logits live.
    """

    def __init__(self, slots: int, device: torch.device) -> None:
        self.device = device
        self.configs: list[SamplingConfig | None] = [None] * slots
        """The host copy: which rows sample, penalise, ban n-grams (decided without a sync)."""
        self.temperature = torch.ones(slots, device=device)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.penalty = torch.ones(slots, device=device)
        self.generators: list[torch.Generator | None] = [None] * slots

    def set(self, rows: Sequence[int], configs: Sequence[SamplingConfig]) -> None:
        """Give ``rows`` their settings (one host-to-device copy per field)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)

        def values(field: str) -> torch.Tensor:
            return torch.tensor([getattr(c, field) for c in configs], device=self.device)

        self.temperature[idx] = values("temperature").float()
        self.top_p[idx] = values("top_p").float()
        self.penalty[idx] = values("repetition_penalty").float()
        self.top_k[idx] = values("top_k")
        for row, cfg in zip(rows, configs):
            self.configs[row] = cfg
            self.generators[row] = None
            if cfg.do_sample:
                self.generators[row] = torch.Generator(device=self.device).manual_seed(cfg.seed)

    def move(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Rows ``src`` become rows ``dst``."""
        i = torch.as_tensor(list(src), device=self.device)
        j = torch.as_tensor(list(dst), device=self.device)
        for t in (self.temperature, self.top_k, self.top_p, self.penalty):
            t[j] = t[i]
        for a, b in zip(src, dst):
            self.configs[b], self.generators[b] = self.configs[a], self.generators[a]
            self.configs[a], self.generators[a] = None, None

    def clear(self, rows: Sequence[int]) -> None:
        for row in rows:
            self.configs[row], self.generators[row] = None, None


def penalize(
    logits: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """Repetition penalty per row: a logit of a token in the row's history is divided by the
    row's penalty when positive, multiplied when negative (a penalty of 1 changes nothing).

    Args:
        logits: ``[n, V]``.
        history: ``[n, H]`` token ids; ``lengths`` ``[n]`` of them are the row's.
        penalty: ``[n]``.
    """
    n, vocab = logits.shape
    valid = torch.arange(history.shape[1], device=logits.device) < lengths[:, None]  # [n, H]
    ids = torch.where(valid, history, vocab)  # a spare column for what is not history
    seen = torch.zeros(n, vocab + 1, dtype=torch.bool, device=logits.device)
    seen = seen.scatter_(1, ids, True)[:, :vocab]  # [n, V]
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def banned_ngrams(history: torch.Tensor, lengths: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """``[r, V]`` bool: the tokens that would repeat an ``n``-gram of each row's history (the
    row's last ``n - 1`` tokens followed by them already occur in it).

    Args:
        history: ``[r, H]``; ``lengths`` ``[r]`` of each row are its tokens.
    """
    r, h = history.shape
    device = history.device
    banned = torch.zeros(r, vocab + 1, dtype=torch.bool, device=device)
    if h < n:
        return banned[:, :vocab]
    windows = history.unfold(1, n, 1)  # [r, h-n+1, n]
    inside = torch.arange(h - n + 1, device=device)[None] + n <= lengths[:, None]  # [r, h-n+1]
    at = (lengths[:, None] - (n - 1) + torch.arange(n - 1, device=device)).clamp(min=0)
    prefix = history.gather(1, at)  # [r, n-1]: what the next token extends
    matches = inside & (windows[..., :-1] == prefix[:, None]).all(dim=-1)  # [r, h-n+1]
    banned.scatter_(1, torch.where(matches, windows[..., -1], vocab), True)
    return banned[:, :vocab]


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator],
    cuts: Sequence[tuple[int, float]] | None = None,
) -> torch.Tensor:
    """One token per row ``[n]`` from ``logits`` ``[n, V]``: divided by the row's temperature,
    cut to its top-k (ties at the k-th value kept), then to the smallest set whose probability
    reaches its top-p (the token that crosses p kept), and drawn with the row's generator.

    ``cuts`` is each row's ``(top_k, top_p)`` as the host knows them (default: read from the
    tensors): rows with a top-k are cut through ``topk`` (k values, not a sort of the
    vocabulary), rows with only a top-p through one sort, rows with neither not at all.

    The draw is the Gumbel-max trick: the argmax of the logits plus Gumbel noise from the row's
    generator, an exact sample of the softmax. It needs no normalisation or cumulative sum, so
    the last-bit differences between a row computed in a batch and alone do not move it: a draw
    changes only if two perturbed logits tie to within them. Inverting the cumulative
    distribution does not have that property: a flat distribution over 50k tokens shifts by a
    good part of one token's width when the normaliser changes in its last bits, and a seeded
    sample then differs from the same request alone."""
    logits = logits.float() / temperature[:, None]
    if cuts is None:
        cuts = list(zip(top_k.tolist(), top_p.tolist()))
    with_k = [i for i, (k, _) in enumerate(cuts) if k > 0]
    only_p = [i for i, (k, p) in enumerate(cuts) if k == 0 and p < 1.0]
    if with_k or only_p:
        logits = logits.clone()
    if with_k:
        rows = torch.as_tensor(with_k, device=logits.device)
        largest = min(max(cuts[i][0] for i in with_k), logits.shape[-1])
        logits[rows] = _cut_top_k(logits[rows], top_k[rows], top_p[rows], largest)
    if only_p:
        rows = torch.as_tensor(only_p, device=logits.device)
        logits[rows] = _cut_top_p(logits[rows], top_p[rows])
    noise = torch.stack(
        [torch.rand(logits.shape[-1], generator=g, device=logits.device) for g in generators]
    )  # [n, V] uniform
    gumbel = -torch.log(-torch.log(noise.clamp(min=torch.finfo(noise.dtype).tiny)))
    return (logits + gumbel).argmax(dim=-1)


def _cut_top_k(logits, top_k, top_p, largest: int) -> torch.Tensor:
    """Rows with a top-k: below the k-th value goes, then top-p within the k kept."""
    values, order = logits.topk(largest, dim=-1)  # [m, K], descending
    k = top_k.clamp(max=largest)
    kth = values.gather(1, (k - 1)[:, None])  # [m, 1]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    inside = torch.arange(largest, device=logits.device)[None] < k[:, None]  # [m, K]
    values = values.masked_fill(~inside, float("-inf"))
    probs = values.softmax(-1)
    drop = (probs.cumsum(-1) - probs > top_p[:, None]) & inside  # the crossing token stays
    kept = values.masked_fill(drop, float("-inf"))
    # beyond this row's k, topk's order is arbitrary among ties with the k-th value: those keep
    # their logits (cut above when smaller), whatever the batch's largest k
    beyond = torch.where(values == kth, values, torch.full_like(values, float("-inf")))
    return logits.scatter(1, order, torch.where(inside, kept, beyond))


def _cut_top_p(logits, top_p) -> torch.Tensor:
    """Rows with only a top-p: one sort of the vocabulary."""
    ordered, order = torch.sort(logits, descending=True, dim=-1)  # [m, V]
    probs = ordered.softmax(-1)
    drop = probs.cumsum(-1) - probs > top_p[:, None]
    return logits.scatter(1, order, ordered.masked_fill(drop, float("-inf")))


def choose(
    logits: torch.Tensor,
    slots: Sequence[int],
    settings: RowSettings,
    history: torch.Tensor,
    lengths: torch.Tensor,
    host_lengths: dict[int, int],
    first: int = 0,
) -> torch.Tensor:
    """The next token ``[W]`` of every row of ``logits`` ``[W, V]``, by each row's settings.

    Args:
        slots: the rows that are generating (row ``i`` of ``logits`` is slot ``first + i``; the
            others get argmax filler).
        history: ``[W, H]`` the rows' tokens so far (prompt included), which penalties read;
            ``lengths`` ``[W]`` of each are the row's.
        host_lengths: each slot's history length as the host knows it (bounds the n-gram search
            without a sync).
    """
    configs = [settings.configs[s] for s in slots]
    width = logits.shape[0]
    if any(c.repetition_penalty != 1.0 for c in configs):
        logits = penalize(logits, history, lengths, settings.penalty[first : first + width])
    sizes = sorted({c.no_repeat_ngram_size for c in configs} - {0})
    if sizes:
        logits = logits.clone()
    for n in sizes:
        group = [s for s, c in zip(slots, configs) if c.no_repeat_ngram_size == n]
        idx = torch.as_tensor([s - first for s in group], device=logits.device)
        span = max(host_lengths[s] for s in group)
        ban = banned_ngrams(history[idx, :span], lengths[idx], n, logits.shape[-1])
        logits[idx] = logits[idx].masked_fill(ban, float("-inf"))
    nxt = logits.argmax(dim=-1)  # [W]
    sampled = [s for s, c in zip(slots, configs) if c.do_sample]
    if sampled:
        rows = torch.as_tensor([s - first for s in sampled], device=logits.device)
        at = torch.as_tensor(sampled, device=logits.device)
        draws = sample(
            logits[rows],
            settings.temperature[at],
            settings.top_k[at],
            settings.top_p[at],
            [settings.generators[s] for s in sampled],
            [(settings.configs[s].top_k, settings.configs[s].top_p) for s in sampled],
        )
        nxt = nxt.index_copy(0, rows, draws)
    return nxt


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """``[n, 1 + 2k]`` float64: the chosen token's log-probability, then the ``k`` most likely
    tokens' ids and log-probabilities, from the model's own logits (before penalties and
    temperature, as OpenAI reports them)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    own = lp.gather(1, chosen[:, None])  # [n, 1]
    if k == 0:
        return own.double()
    best = lp.topk(k, dim=-1)
    return torch.cat([own.double(), best.indices.double(), best.values.double()], dim=1)

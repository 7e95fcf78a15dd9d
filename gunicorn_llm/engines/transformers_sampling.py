"""From one step's logits to each row's next token, every row under its own request's sampling parameters, as the
slot engine needs it (transformers_slots.py); the log-probability and penalty arithmetic is shared with the other
paths of the transformers engine, so that they report the same numbers.

Per row, in the batched-generate path's order (transformers_generate.py, which uses transformers' processors): the
structured-output mask (grammars.py: a constrained row keeps only the tokens its grammar allows), the
model's log-probabilities (before any other transform, as vLLM reports them), the request's token controls
(token_controls.py: allowed ids, bad words, min_tokens, logit bias), repetition penalty (over prompt and
output), presence and frequency penalties (over the output), then temperature, top-k, top-p and min-p, and the draw.
Everything is vectorised over the rows; a row pays only for what its request asks for (log-probabilities and
penalties are computed for the rows that want them only).

The draw is the exponential race (argmax of p / q with q ~ Exp(1), which picks a token with probability p, as vLLM
does): a seeded row draws its q from its own generator, so its text does not depend on the rows beside it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from gunicorn_llm.engines.base import TokenLogprob
from gunicorn_llm.engines.grammars import mask_logits
from gunicorn_llm.engines.token_controls import TokenControls, apply_to_rows
from gunicorn_llm.request_schema import SamplingParams


class SampledRow(Protocol):
    """What the sampler reads of a running sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None  # a seeded sampling sequence's own random numbers; None: the global ones
    matcher: object | None  # a constrained sequence's xgrammar matcher (grammars.py); None: unconstrained
    controls: TokenControls | None  # its request's token controls (token_controls.py); None: none asked for


def generator_for(params: SamplingParams, choice: int, device: torch.device) -> torch.Generator | None:
    """A seeded sampling choice's generator: choice c of n draws from seed + c (as vLLM derives its children's
    seeds), so choices differ from each other and each is reproducible. None when the choice needs no seed."""
    if params.seed is None or params.is_greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed + choice)


def has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def presence_frequency_penalized(logits: torch.Tensor, counts: torch.Tensor, presence, frequency) -> torch.Tensor:
    """OpenAI's presence and frequency penalties, given how often each token was generated (`counts`, like
    `logits`); `presence` and `frequency`: numbers, or one per row as a column."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, tops: list[int]) -> list[TokenLogprob]:
    """For each row of `logprobs` (log-probabilities over the vocabulary), the row's token of `tokens` with its
    log-probability and the row's `tops[i]` likeliest alternatives."""
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1).tolist()
    top_values, top_ids = logprobs.topk(max(tops, default=0), dim=-1)
    return [
        TokenLogprob(token, value, tuple(zip(ids[:top], values[:top], strict=True)))
        for token, value, ids, values, top in zip(tokens.tolist(), chosen, top_ids.tolist(), top_values.tolist(), tops,
                                                  strict=True)
    ]


class RowSampler:
    """Picks each row's next token from one step's float32 logits [rows, vocabulary] (which it may overwrite)."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.device = device
        self._ranks = torch.arange(vocab_size, device=device)  # for top-k over the sorted vocabulary

    def next_tokens(self, logits: torch.Tensor, rows: list[SampledRow]
                    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Each row's next token, and its log-probability entry where its request asked for them."""
        mask_logits(logits, [row.matcher for row in rows])
        wanting = [index for index, row in enumerate(rows) if row.params.logprobs is not None]
        model_logprobs = torch.log_softmax(logits[wanting], dim=-1) if wanting else None  # before any transform
        apply_to_rows(logits, [row.controls for row in rows], [row.output_ids for row in rows])
        self._penalize(logits, rows)
        tokens = self._draw(logits, rows)
        entries: list[TokenLogprob | None] = [None] * len(rows)
        if wanting:
            chosen = tokens[torch.tensor(wanting, device=self.device)]
            tops = [rows[index].params.logprobs for index in wanting]
            for index, entry in zip(wanting, token_logprobs(model_logprobs, chosen, tops), strict=False):
                entries[index] = entry
        return tokens.tolist(), entries

    def _penalize(self, logits: torch.Tensor, rows: list[SampledRow]) -> None:
        """Repetition (prompt and output tokens), presence and frequency (output tokens) penalties, in place."""
        penalized = [index for index, row in enumerate(rows) if has_penalties(row.params)]
        if not penalized:
            return
        seen = [rows[index].prompt_ids + rows[index].output_ids for index in penalized]
        width = max(map(len, seen))
        ids = torch.tensor([tokens + [0] * (width - len(tokens)) for tokens in seen], device=self.device)
        # 1 where a column holds a real token (in_output: one of the output's), 0 on padding
        in_sequence = torch.tensor([[1.0] * len(tokens) + [0.0] * (width - len(tokens)) for tokens in seen])
        in_output = torch.tensor([[0.0] * len(rows[index].prompt_ids) + [1.0] * len(rows[index].output_ids)
                                  + [0.0] * (width - len(tokens))
                                  for index, tokens in zip(penalized, seen, strict=False)])
        weights = torch.stack([in_sequence, in_output]).to(self.device)
        settings = torch.tensor([[rows[index].params.repetition_penalty, rows[index].params.presence_penalty,
                                  rows[index].params.frequency_penalty] for index in penalized]).to(self.device)
        repetition, presence, frequency = settings.T[:, :, None]
        index = torch.tensor(penalized, device=self.device)
        scores = logits[index]
        occurrences = torch.zeros(2, *scores.shape, device=self.device).scatter_add_(2, ids.expand(2, -1, -1), weights)
        repeated = torch.where(scores < 0, scores * repetition, scores / repetition)
        scores = torch.where(occurrences[0] > 0, repeated, scores)
        logits[index] = presence_frequency_penalized(scores, occurrences[1], presence, frequency)

    def _draw(self, logits: torch.Tensor, rows: list[SampledRow]) -> torch.Tensor:
        """Greedy rows: the argmax; the others: a draw from their distribution."""
        greedy = [row.params.is_greedy for row in rows]
        if all(greedy):
            return logits.argmax(dim=-1)
        probs, order = self.sorted_distribution(logits, rows)
        race = torch.empty_like(probs).exponential_()
        for index, row in enumerate(rows):
            if row.generator is not None:
                race[index].exponential_(generator=row.generator)
        # a zero from the exponential would make 0/0 for a cut token
        winners = (probs / race.clamp_min_(torch.finfo(race.dtype).tiny)).argmax(dim=-1, keepdim=True)
        sampled = order.gather(-1, winners).squeeze(-1)
        return torch.where(torch.tensor(greedy, device=self.device), logits.argmax(dim=-1), sampled)

    def sorted_distribution(self, logits: torch.Tensor, rows: list[SampledRow]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's sampling distribution after temperature, top-k, top-p and min-p (unnormalised once cut), most
        likely first, with the token ids in that order (greedy rows: the untempered distribution, unused)."""
        vocab = self._ranks.numel()
        settings = torch.tensor(
            [[1.0 if row.params.is_greedy else row.params.temperature for row in rows],
             [row.params.top_k if row.params.top_k > 0 else vocab for row in rows],
             [row.params.top_p for row in rows],
             [row.params.min_p for row in rows]],
            dtype=torch.float32,
        ).to(self.device)
        temperature, top_k, top_p, min_p = settings
        ordered, order = (logits / temperature[:, None]).sort(dim=-1, descending=True)
        ordered.masked_fill_(self._ranks[None, :] >= top_k[:, None], float("-inf"))
        probs = ordered.softmax(dim=-1)
        # min-p is relative to the likeliest token, which top-k and top-p always keep: the order of the cuts is moot
        cut = (probs.cumsum(dim=-1) - probs > top_p[:, None]) | (probs < min_p[:, None] * probs[:, :1])
        return probs.masked_fill_(cut, 0.0), order

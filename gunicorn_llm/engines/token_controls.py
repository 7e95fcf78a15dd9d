"""vLLM's per-request token controls for the transformers engine: `logit_bias`, `allowed_token_ids`, `bad_words` and
`min_tokens`, applied to each controlled row of a step's logits, on the slot, continuous-batching and
batched-generate paths alike.

As in vLLM's sampler, they come after the model's log-probabilities are taken (which they do not change) and before
the penalties, in vLLM's order: only the allowed ids are kept; bad words are banned; end-of-sequence and stop tokens
are banned until `min_tokens` tokens were generated (unless nothing else is left: vLLM gives them back to a
constrained sequence then); the biases are added. Bad words follow vLLM's rule (its SamplingParams
.update_from_tokenizer and v1/sample/ops/bad_words.py): a word is tokenized as it is (leading whitespace dropped) and
with one leading space (kept where that gives another first token and as many tokens), and the last token of each
such sequence is banned at a step where the answer so far ends with the tokens before it (a one-token word: always).
The tokens before it are the answer's own, never the prompt's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from gunicorn_llm.request_schema import SamplingParams

MAX_BAD_WORD_SEQUENCES = 128  # vLLM's limit (VLLM_MAX_NUM_BAD_WORDS' default), counted after tokenization


def bad_words_token_ids(tokenizer, words: Iterable[str]) -> list[list[int]]:
    """The token sequences vLLM bans for `words`; ValueError naming a word that tokenizes to nothing, or when there
    are more sequences than vLLM takes."""
    sequences: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not plain:
            raise ValueError(f"{word!r} tokenizes to no token")
        sequences.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    if len(sequences) > MAX_BAD_WORD_SEQUENCES:
        raise ValueError(f"{len(sequences)} token sequences after tokenization (with and without a leading space); "
                         f"at most {MAX_BAD_WORD_SEQUENCES} are taken")
    return sequences


@dataclass(frozen=True)
class TokenControls:
    """One request's controls, its token ids on the model's device once, for all its rows and steps."""

    allowed: torch.Tensor | None  # ids that may be generated; None: all
    bad_words: tuple[tuple[int, ...], ...]
    min_tokens: int
    held_back: torch.Tensor  # end-of-sequence and stop ids, banned while fewer than min_tokens were generated
    bias_ids: torch.Tensor | None
    biases: torch.Tensor | None

    @classmethod
    def of(cls, params: SamplingParams, tokenizer, stop_ids: Iterable[int], device: torch.device
           ) -> TokenControls | None:
        """A request's controls (`stop_ids`: what min_tokens holds back); None when it asks for none."""
        if not params.controls_tokens:
            return None

        def ids(values: Iterable[int]) -> torch.Tensor:
            return torch.tensor(sorted(set(values)), dtype=torch.long, device=device)

        bias = dict(params.logit_bias or ())
        return cls(
            allowed=ids(params.allowed_token_ids) if params.allowed_token_ids else None,
            bad_words=tuple(map(tuple, bad_words_token_ids(tokenizer, params.bad_words or ()))),
            min_tokens=params.min_tokens,
            held_back=ids(stop_ids),
            bias_ids=ids(bias) if bias else None,
            biases=torch.tensor([bias[token] for token in sorted(bias)], device=device) if bias else None,
        )

    @property
    def context(self) -> int:
        """How many of the answer's last tokens a bad word's ban depends on."""
        return max((len(word) - 1 for word in self.bad_words), default=0)

    def apply(self, logits: torch.Tensor, generated: int, recent: Sequence[int]) -> None:
        """In place, on one row's logits [vocabulary]: `generated` tokens so far, ending with `recent` (at least the
        last `context` of them)."""
        if self.allowed is not None:
            kept = logits[self.allowed]
            logits.fill_(float("-inf"))
            logits[self.allowed] = kept
        for word in self.bad_words:
            before = len(word) - 1
            if before <= generated and (before == 0 or list(recent[-before:]) == list(word[:-1])):
                logits[word[-1]] = float("-inf")
        if generated < self.min_tokens and self.held_back.numel():
            held = logits[self.held_back]
            logits[self.held_back] = float("-inf")
            nothing_left = torch.isneginf(logits).all()  # stays on the device: no synchronisation per step
            logits[self.held_back] = torch.where(nothing_left, held, torch.full_like(held, float("-inf")))
        if self.bias_ids is not None:
            logits.index_add_(0, self.bias_ids, self.biases.to(logits.dtype))


def apply_to_rows(logits: torch.Tensor, controls: Sequence[TokenControls | None],
                  outputs: Sequence[Sequence[int]]) -> None:
    """In place, on a batch's logits [rows, vocabulary]: each row under its request's `controls` (None: none), given
    the tokens it generated so far (`outputs`, one list per row)."""
    for index, (row_controls, output) in enumerate(zip(controls, outputs, strict=True)):
        if row_controls is not None:
            row_controls.apply(logits[index], len(output), output)

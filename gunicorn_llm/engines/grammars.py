"""Structured outputs for the transformers engine, with xgrammar (the grammar library vLLM's engine uses by default).

A request's constraint (request_schema.StructuredOutputs) is compiled once for the model's tokenizer and cached by
its text; each constrained sequence gets a matcher of its own, which masks the sequence's row of every step's logits
to the tokens its grammar allows next and is advanced with each token drawn. Once the grammar is complete it allows
only an end-of-sequence token, and the matcher terminates when that is drawn: the sequence ends there. Rows without
a matcher in the same batch are left as they are, so constrained and unconstrained sequences share a batch.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence

import torch
import xgrammar

from gunicorn_llm.request_schema import StructuredOutputs

CACHED_GRAMMARS = 256  # compiled constraints kept per worker, the least recently used dropped first
ANY_JSON_OBJECT = '{"type": "object"}'  # json_object, as vLLM compiles it
_WHERE_IN_XGRAMMAR = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[02:30:35] /project/cpp/regex_converter.cc:83: "


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (vLLM's translation of `choice`)."""
    # xgrammar's EBNF string literals take JSON's escapes
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def is_lark(grammar: str) -> bool:
    """Whether a grammar is written in Lark rather than EBNF: no line defines a rule with `::=` (vLLM's test)."""
    return not any("::=" in line.split("#")[0].split("//")[0] for line in grammar.splitlines())


class Grammars:
    """One tokenizer's compiled constraints. Called from request threads (compile) and batching threads (matcher)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]):
        """`vocab_size`: the width of the model's logits (which may exceed the tokenizer's vocabulary);
        `stop_token_ids`: what ends a sequence whose grammar is complete."""
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids) or None)
        # xgrammar's own cache is off: ours is keyed by the whole constraint, and bounded by count
        self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.vocab_size = vocab_size
        self.stop_token_ids = frozenset(info.stop_token_ids)  # a matcher terminates on drawing one of them
        self.compile = functools.lru_cache(maxsize=CACHED_GRAMMARS)(self._compile)

    def _compile(self, constraint: StructuredOutputs) -> xgrammar.CompiledGrammar:
        """The constraint compiled; ValueError saying why when it cannot be (xgrammar's own message)."""
        try:
            if constraint.json_schema is not None:
                return self._compiler.compile_json_schema(constraint.json_schema)
            if constraint.json_object:
                return self._compiler.compile_json_schema(ANY_JSON_OBJECT)
            if constraint.regex is not None:
                return self._compiler.compile_regex(constraint.regex)
            if constraint.choice is not None:
                return self._compiler.compile_grammar(choice_grammar(constraint.choice))
            if is_lark(constraint.grammar):
                return self._compiler.compile_lark(constraint.grammar)
            return self._compiler.compile_grammar(constraint.grammar)
        except Exception as error:  # noqa: BLE001 - xgrammar raises RuntimeError or ValueError for a bad constraint
            raise ValueError(f"cannot be compiled: {_WHERE_IN_XGRAMMAR.sub('', str(error)).strip()}") from None



def new_matcher(grammars: Grammars | None, constraint: StructuredOutputs | None) -> xgrammar.GrammarMatcher | None:
    """A new sequence's matcher, from a path's `grammars`; None for an unconstrained sequence."""
    if constraint is None:
        return None
    if grammars is None:
        raise RuntimeError("this batching path was built without grammars: it serves no structured outputs")
    return xgrammar.GrammarMatcher(grammars.compile(constraint))


def mask_logits(logits: torch.Tensor, matchers: Sequence[xgrammar.GrammarMatcher | None]) -> None:
    """In place: each row of `logits` [rows, vocabulary] that has a running matcher keeps only the tokens its
    grammar allows next (the others become -inf); rows without one are untouched."""
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None and not matcher.is_terminated()]
    if not rows:
        return
    bitmask = xgrammar.allocate_token_bitmask(len(matchers), logits.shape[-1])
    for row in rows:
        matchers[row].fill_next_token_bitmask(bitmask, row)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)


def advance(matcher: xgrammar.GrammarMatcher | None, token: int) -> bool:
    """Feed a sequence's new token to its matcher; whether the grammar has ended the sequence."""
    if matcher is None:
        return False
    matcher.accept_token(token)
    return matcher.is_terminated()

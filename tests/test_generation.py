"""gunicorn_llm/engines/generation.py: engine tokens to text for every route, with a scripted engine and the
embedded model's tokenizer.

The engines themselves are exercised end to end elsewhere; here the token streams are chosen to pin the text
rules: stop strings split across tokens, the stop token left out, held-back text, and cancellation.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from gunicorn_llm.engines.base import ChoiceUpdate, GenerationStream
from gunicorn_llm.engines.generation import TextGeneration, _ChoiceText
from gunicorn_llm.request_schema import SamplingParams
from scripted_engine import ScriptedEngine

pytestmark = pytest.mark.inprocess


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokens_become_the_decoded_text(tokenizer):
    engine = ScriptedEngine(tokenizer, [ids(tokenizer, " one two three")])
    (result,) = TextGeneration(engine, [1], SamplingParams(max_tokens=3)).collect()
    assert result.text == " one two three" and result.finish_reason == "length"


def test_stop_token_is_left_out_of_the_text(tokenizer):
    engine = ScriptedEngine(tokenizer, [ids(tokenizer, " done") + [tokenizer.eos_token_id]], finish="stop")
    (result,) = TextGeneration(engine, [1], SamplingParams(skip_special_tokens=False)).collect()
    assert result.text == " done" and result.finish_reason == "stop"


def test_stop_string_split_over_tokens_ends_the_text_before_it_and_cancels(tokenizer):
    engine = ScriptedEngine(tokenizer, [ids(tokenizer, " alpha beta gamma delta")], finish=None)
    generation = TextGeneration(engine, [1], SamplingParams(stop=("ta gam",)))
    deltas = list(generation)
    assert "".join(d.text for d in deltas) == " alpha be"
    assert deltas[-1].finish_reason == "stop"
    assert engine.aborted == 1  # the engine was told to stop at once


def test_no_delta_ever_shows_part_of_a_stop_string(tokenizer):
    engine = ScriptedEngine(tokenizer, [ids(tokenizer, " a b c d e f")])
    texts = [d.text for d in TextGeneration(engine, [1], SamplingParams(stop=(" d e",)))]
    assert "".join(texts) == " a b c"
    assert all(" d" not in text for text in texts)


def test_each_choice_is_decoded_on_its_own(tokenizer):
    engine = ScriptedEngine(tokenizer, [ids(tokenizer, " red"), ids(tokenizer, " blue sky")])
    results = TextGeneration(engine, [1], SamplingParams(n=2)).collect()
    assert [r.text for r in results] == [" red", " blue sky"]


def test_closing_a_generation_early_cancels_it_in_the_engine(tokenizer):
    engine = ScriptedEngine(tokenizer, [ids(tokenizer, " one two three four")], finish=None)
    generation = TextGeneration(engine, [1], SamplingParams(max_tokens=4))
    iterator = iter(generation)
    next(iterator)
    iterator.close()  # what gunicorn does when the client of a streaming response goes away
    assert engine.aborted == 1


def test_a_finished_generation_is_not_cancelled(tokenizer):
    engine = ScriptedEngine(tokenizer, [ids(tokenizer, " fine")])
    generation = TextGeneration(engine, [1], SamplingParams())
    generation.collect()
    generation.cancel()
    assert engine.aborted == 0


def test_a_reader_that_fell_behind_gets_the_queued_updates_merged_in_one(tokenizer):
    tokens = ids(tokenizer, " one two three four")
    engine = ScriptedEngine(tokenizer, [tokens, ids(tokenizer, " five")])
    stream = engine.start([1], SamplingParams(n=2))
    updates = list(stream)
    assert [(u.choice, u.token_ids, u.finish_reason) for u in updates] == [
        (0, tokens, "length"), (1, ids(tokenizer, " five"), "length")]
    assert updates[0].first_at < updates[0].at  # produced over a span: the first token's time is kept


def test_a_collected_answer_wakes_its_reader_at_the_first_token_and_at_the_end_only(tokenizer):
    tokens = ids(tokenizer, " one two three four")
    stream = GenerationStream(1, abort=lambda: None, incremental=False)
    for position, token in enumerate(tokens):
        stream.publish(ChoiceUpdate(0, [token], None, "length" if position == len(tokens) - 1 else None))
    assert stream._updates.qsize() == 2  # the request is running; then the rest at once
    (update,) = list(stream)
    assert update.token_ids == tokens and update.finish_reason == "length"


def test_a_stream_interval_hands_over_the_first_token_then_that_many_then_the_rest_at_the_end(tokenizer):
    stream = GenerationStream(2, abort=lambda: None, interval=3)
    for position in range(8):  # choice 0: 8 tokens; choice 1: 2 tokens, ending after the second
        stream.publish(ChoiceUpdate(0, [position], None, "length" if position == 7 else None))
        if position < 2:
            stream.publish(ChoiceUpdate(1, [100 + position], None, "stop" if position == 1 else None))
    handed_over = [stream._updates.get_nowait() for _ in range(stream._updates.qsize())]
    assert [(u.choice, u.token_ids, u.finish_reason) for u in handed_over] == [
        (0, [0], None), (1, [100, 101], "stop"), (0, [1, 2, 3], None), (0, [4, 5, 6], None), (0, [7], "length")]


def test_a_stop_string_in_tokens_held_by_the_stream_interval_still_ends_the_text_before_it(tokenizer):
    engine = ScriptedEngine(tokenizer, [ids(tokenizer, " one two three four five six")], finish=None,
                            stream_interval=4)
    deltas = list(TextGeneration(engine, [1], SamplingParams(stop=(" three",))))
    assert "".join(delta.text for delta in deltas) == " one two" and deltas[-1].finish_reason == "stop"
    assert engine.aborted == 1
    # The answer's tokens end with the one that completed the stop string, as in vLLM: not the held ones after it.
    assert sum((delta.token_ids for delta in deltas), []) == ids(tokenizer, " one two three")


def test_a_collected_answer_counts_no_token_past_its_stop_string(tokenizer):
    # Everything is published before the reader starts, so it gets one merged update that runs past the stop string.
    engine = ScriptedEngine(tokenizer, [ids(tokenizer, " one two three four five six")], finish=None)
    [result] = TextGeneration(engine, [1], SamplingParams(stop=("four", " two"))).collect()
    assert (result.text, result.finish_reason) == (" one", "stop")
    assert result.token_ids == ids(tokenizer, " one two")


def test_collecting_without_stop_strings_holds_updates_and_with_them_does_not(tokenizer):
    engine = ScriptedEngine(tokenizer, [ids(tokenizer, " fine")])
    TextGeneration(engine, [1], SamplingParams()).collect()
    TextGeneration(engine, [1], SamplingParams(stop=("x",))).collect()
    assert [stream.incremental for stream in engine.streams] == [False, True]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", [" naïve café, 日本語 and 🙂🙃 emoji", "  spaces\n\n and\ttabs  ",
                                  "<|im_end|> special"])
def test_text_decoded_token_by_token_is_the_whole_decode_and_never_shows_a_broken_character(
        tokenizer, text, skip_special_tokens):
    tokens = ids(tokenizer, text)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    choice = _ChoiceText(tokenizer, params, set())
    pieces = [choice.advance(ChoiceUpdate(0, [token], None, None))[0] for token in tokens[:-1]]
    pieces.append(choice.advance(ChoiceUpdate(0, tokens[-1:], None, "length"))[0])
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

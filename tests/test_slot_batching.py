"""`transformers_slots.SlotBatching` driven directly (no server), on CPU with eager steps, on the embedded model.

Covered: greedy answers equal plain transformers `generate` token for token while more prompts than slots run
concurrently (queued prompts wait, a finished slot is refilled by moving the last running sequence, a sequence
crosses from the 128-column length bucket into the next); prompts sharing a prefix (run once, or copied from a
running slot); n=2; the three ends of a choice (`max_tokens`, a stop token, the `max_len` cap) and the prompt-length
refusal; cancelling; the sampling path (top-k 1 equals greedy, also in one step with a top-p sampled row and a greedy
row); `paused`; the loop's death (`on_death`, open and queued streams fail, later `start`s are refused), also when its
thread's CUDA set-up fails (and the batching thread's); `supports`
and `can_serve`; how many slots a cache budget holds.

Every request on the fast path, against the engine's batched-generate path or transformers' own processors: a
greedy request's seed changes nothing and keeps it on the slot path; seeded sampling gives the same tokens alone
and among other rows; logprobs and penalty rows equal the batched-generate path's; temperature, top-k, top-p and
min-p equal transformers' warpers; prompt log-probabilities of requests waiting together share forward passes
(also within a small token budget) and equal one forward pass per prompt.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from conftest import FLOAT32_SCORING, plain_generate
from gunicorn_llm.engines import transformers_generate
from gunicorn_llm.engines.base import EngineDied, TokenLogprob
from gunicorn_llm.engines.transformers_slots import SlotBatching, SlotCache, supports
from gunicorn_llm.request_schema import RequestError, SamplingParams

MAX_LEN = 256  # length buckets 128 and 256
SLOTS = 3
GREEDY = {"temperature": 0.0, "ignore_eos": True}
NO_STOP: frozenset[int] = frozenset()  # the server's stop set when ignore_eos is set and no stop_token_ids
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
    "metal type, oil-based ink and a wooden press adapted from those used to make wine. Within a few decades "
    "printing shops had opened in most of the large cities of Europe, and the price of books fell so far that "
    "ordinary merchants could afford them. Scholars argue about how much the new technology changed the way "
    "people thought, but nobody doubts that it changed how quickly ideas could travel from one town to the next. "
    "Newspapers, pamphlets and cheap almanacs followed, and with them came censors, copyright and the first "
    "arguments about who owns the words a writer puts on the page. "
)


@pytest.fixture(scope="module")
def tokenizer(reference_model):
    return reference_model[0]


@pytest.fixture(scope="module")
def long_ids(tokenizer):
    ids = tokenizer(TEXT * 3)["input_ids"]
    assert len(ids) > MAX_LEN + 8
    return ids


_expected: dict[tuple[tuple[int, ...], int], list[int]] = {}


def greedy_ids(reference_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy `generate`'s new tokens for token ids, end-of-sequence ignored (exactly max_new_tokens)."""
    key = (tuple(prompt_ids), max_new_tokens)
    if key not in _expected:
        _, model = reference_model
        with torch.inference_mode():
            output = model.generate(input_ids=torch.tensor([prompt_ids]),
                                    attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
        _expected[key] = output[0, len(prompt_ids) :].tolist()
        assert len(_expected[key]) == max_new_tokens
    return _expected[key]


def collect(stream, timeout_s: float = 60.0, logprobs: dict[int, list[TokenLogprob]] | None = None
            ) -> tuple[dict[int, list[int]], dict[int, str]]:
    """Every choice's tokens and finish reason (and into `logprobs`, each choice's entries); fails
    (DeadlineExceeded) instead of hanging."""
    tokens: dict[int, list[int]] = {choice: [] for choice in range(stream.choices)}
    reasons: dict[int, str] = {}
    for update in stream.updates(deadline=time.monotonic() + timeout_s):
        assert update.choice not in reasons, f"an update after choice {update.choice} finished: {update}"
        assert update.token_ids or update.finish_reason, update
        tokens[update.choice].extend(update.token_ids)
        if logprobs is not None and update.logprobs is not None:
            assert len(update.logprobs) == len(update.token_ids), update
            logprobs.setdefault(update.choice, []).extend(update.logprobs)
        if update.finish_reason is not None:
            reasons[update.choice] = update.finish_reason
    return tokens, reasons


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def slots(reference_model):
    """One engine for the module (3 slots of 256 tokens), built on the reference model's own model object; each
    decode step records its batch (rows, running() including the queue, each row's params)."""
    _, model = reference_model
    steps: list[tuple[int, int, tuple[SamplingParams, ...]]] = []
    deaths: list[BaseException] = []
    built: list[SlotBatching] = []

    def on_step():
        engine = built[0]
        steps.append((len(engine._running), engine.running(), tuple(s.params for s in engine._running)))

    engine = SlotBatching(model, SLOTS, MAX_LEN, cache_bytes=2**30, cuda_graphs=False, on_death=deaths.append,
                          on_step=on_step)
    built.append(engine)
    assert engine.slots == SLOTS
    yield SimpleNamespace(engine=engine, steps=steps, deaths=deaths)
    assert not deaths, deaths


@pytest.fixture(autouse=True)
def _idle_between_tests(request):
    """Each test starts and ends with nothing running, so one test's leftovers cannot pass or fail another."""
    if "slots" in request.fixturenames:
        engine = request.getfixturevalue("slots").engine
        assert wait_until(lambda: engine.running() == 0)
    yield
    if "slots" in request.fixturenames:
        assert wait_until(lambda: engine.running() == 0), f"{engine.running()} sequences left running"


def test_concurrent_greedy_prompts_through_fewer_slots_equal_plain_generate(slots, reference_model, tokenizer,
                                                                           long_ids, monkeypatch):
    prompts = [  # (prompt ids, max_tokens); the first, shortest answer frees slot 0 while slot 2 still runs
        (tokenizer("The capital of France is")["input_ids"], 3),
        (tokenizer("1, 2, 3, 4,")["input_ids"], 12),
        (tokenizer("Question: what is 7 times 8?\nAnswer:")["input_ids"], 10),
        (long_ids[:60], 8),
        (long_ids[:122], 10),  # columns 122..131: crosses from the 128 length bucket into the 256 one
    ]
    expected = [greedy_ids(reference_model, ids, max_tokens) for ids, max_tokens in prompts]
    moves: list[tuple[list[int], list[int]]] = []
    move = slots.engine.cache.move
    monkeypatch.setattr(slots.engine.cache, "move", lambda sources, targets: (moves.append((sources, targets)),
                                                                              move(sources, targets))[-1])
    slots.steps.clear()

    # Each request thread starts its prompt right after the previous one did (a known arrival order, so a known
    # slot order), then all read their streams at once.
    started = [threading.Event() for _ in prompts]
    results: list = [None] * len(prompts)

    def request(index: int) -> None:
        try:
            if index:
                assert started[index - 1].wait(10)
            ids, max_tokens = prompts[index]
            stream = slots.engine.start(ids, SamplingParams(max_tokens=max_tokens, **GREEDY), NO_STOP)
            started[index].set()
            results[index] = collect(stream)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            results[index] = error

    threads = [threading.Thread(target=request, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for index, ((ids, _), want, result) in enumerate(zip(prompts, expected, results, strict=True)):
        assert not isinstance(result, BaseException), f"prompt {index}: {result!r}"
        tokens, reasons = result
        assert tokens[0] == want, (f"prompt {index} ({len(ids)} tokens): {tokenizer.decode(tokens[0])!r} != "
                                   f"generate's {tokenizer.decode(want)!r}")
        assert reasons == {0: "length"}
    assert max(rows for rows, _, _ in slots.steps) == SLOTS
    assert max(queued for _, queued, _ in slots.steps) > SLOTS, "no prompt waited for a slot"
    assert any(any(t < s for s, t in zip(sources, targets, strict=True)) for sources, targets in moves), \
        f"no running sequence was moved down into a freed slot: {moves}"


def test_prompts_sharing_a_prefix_run_it_once_and_equal_plain_generate(slots, reference_model, tokenizer,
                                                                      monkeypatch):
    """Few-shot prompts: the examples they start with run once for the prompts prefilled together, in the first
    one's slot, and are copied from a running one's slot for a prompt that arrives later; every answer equals plain
    generate's."""
    shots = tokenizer(TEXT)["input_ids"][:100]
    prompts = [shots + tokenizer(question)["input_ids"] for question in
               ("\nQuestion: who built the first press?\nAnswer:", "\nQuestion: what got cheaper?\nAnswer:",
                "\nQuestion: when did books spread?\nAnswer:")]
    expected = [greedy_ids(reference_model, ids, 24) for ids in prompts]
    copies: list[tuple[int, list[int], int]] = []
    copy_prefix = slots.engine.cache.copy_prefix
    monkeypatch.setattr(slots.engine.cache, "copy_prefix", lambda source, targets, length: (
        copies.append((source, list(targets), length)), copy_prefix(source, targets, length))[-1])
    params = SamplingParams(max_tokens=24, **GREEDY)
    with slots.engine.paused():
        streams = [slots.engine.start(ids, params, NO_STOP) for ids in prompts[:2]]
    assert wait_until(lambda: copies), "the two prompts waiting together did not share their prefix"
    streams.append(slots.engine.start(prompts[2], params, NO_STOP))  # while the first two decode
    assert [collect(stream)[0] for stream in streams] == [{0: want} for want in expected]
    shared = len(os.path.commonprefix(prompts))  # the examples and "\nQuestion:", alike for every pair
    assert shared > len(shots)
    assert copies[0] == (0, [1], shared)
    assert copies[1][0] in (0, 1) and copies[1][1:] == ([2], shared), copies


def test_n2_greedy_choices_both_equal_plain_generate(slots, reference_model, tokenizer):
    prompt = "Question: what is 7 times 8?\nAnswer:"
    ids = tokenizer(prompt)["input_ids"]
    eos = tokenizer.eos_token_id
    tokens_until_eos = greedy_ids(reference_model, ids, 10)
    if eos in tokens_until_eos:
        tokens_until_eos = tokens_until_eos[: tokens_until_eos.index(eos) + 1]
    stream = slots.engine.start(ids, SamplingParams(n=2, temperature=0.0, max_tokens=10), frozenset({eos}))
    tokens, reasons = collect(stream)
    assert tokens == {0: tokens_until_eos, 1: tokens_until_eos}
    want_reason = "stop" if tokens_until_eos[-1] == eos else "length"
    assert reasons == {0: want_reason, 1: want_reason}
    text = plain_generate(reference_model, prompt, max_new_tokens=10)
    assert [tokenizer.decode(tokens[c], skip_special_tokens=True) for c in (0, 1)] == [text, text]


@pytest.mark.parametrize("max_tokens", [1, 6])
def test_max_tokens_gives_exactly_that_many_tokens(slots, reference_model, tokenizer, max_tokens):
    ids = tokenizer("1, 2, 3, 4,")["input_ids"]
    tokens, reasons = collect(slots.engine.start(ids, SamplingParams(max_tokens=max_tokens, **GREEDY), NO_STOP))
    assert tokens == {0: greedy_ids(reference_model, ids, max_tokens)}
    assert reasons == {0: "length"}


def test_stop_token_ends_the_choice_with_that_token_last(slots, reference_model, tokenizer):
    ids = tokenizer("The capital of France is")["input_ids"]
    want = greedy_ids(reference_model, ids, 12)
    # the first k >= 3 whose token generate has not produced before: stopping on it ends after exactly k tokens
    k = next(k for k in range(3, 12) if want[k - 1] not in want[: k - 1])
    tokens, reasons = collect(slots.engine.start(ids, SamplingParams(max_tokens=12, **GREEDY),
                                                 frozenset({want[k - 1]})))
    assert tokens == {0: want[:k]}
    assert reasons == {0: "stop"}


def test_stop_token_as_the_first_token(slots, reference_model, tokenizer):
    """The prompt's first answer token (from the prefill, not a decode step) is end-of-sequence."""
    ids = tokenizer("The end.")["input_ids"]
    eos = tokenizer.eos_token_id
    assert greedy_ids(reference_model, ids, 1) == [eos]
    tokens, reasons = collect(slots.engine.start(ids, SamplingParams(temperature=0.0, max_tokens=8),
                                                 frozenset({eos})))
    assert tokens == {0: [eos]}
    assert reasons == {0: "stop"}


@pytest.mark.parametrize("room", [1, 4])
def test_max_len_caps_prompt_plus_answer(slots, reference_model, long_ids, room):
    ids = long_ids[: MAX_LEN - room]
    tokens, reasons = collect(slots.engine.start(ids, SamplingParams(max_tokens=50, **GREEDY), NO_STOP))
    assert tokens == {0: greedy_ids(reference_model, ids, room)}
    assert reasons == {0: "length"}


@pytest.mark.parametrize("length", [MAX_LEN, MAX_LEN + 5])
def test_prompt_of_max_len_tokens_is_refused(slots, long_ids, length):
    with pytest.raises(RequestError, match="--max-model-len") as refused:
        slots.engine.start(long_ids[:length], SamplingParams(**GREEDY), NO_STOP)
    assert f"{MAX_LEN - 1}" in refused.value.message
    assert slots.engine.running() == 0


def test_cancel_frees_the_slot_and_the_next_request_is_right(slots, reference_model, tokenizer):
    ids = tokenizer("Once upon a time")["input_ids"]
    stream = slots.engine.start(ids, SamplingParams(max_tokens=200, **GREEDY), NO_STOP)
    updates = stream.updates(deadline=time.monotonic() + 30)
    first_two = [next(updates), next(updates)]
    assert [u.finish_reason for u in first_two] == [None, None]
    stream.cancel()
    rest = list(updates)  # ends at the cancel (after what was published before it)
    assert all(u.finish_reason is None for u in rest) and len(first_two) + len(rest) < 20
    assert wait_until(lambda: slots.engine.running() == 0, 5), f"still running: {slots.engine.running()}"

    follow = tokenizer("The capital of France is")["input_ids"]
    tokens, reasons = collect(slots.engine.start(follow, SamplingParams(max_tokens=8, **GREEDY), NO_STOP))
    assert tokens == {0: greedy_ids(reference_model, follow, 8)}
    assert reasons == {0: "length"}


def test_top_k_1_sampling_equals_greedy(slots, reference_model, tokenizer):
    ids = tokenizer("My favourite food is")["input_ids"]  # a second likeliest token near the first at most steps
    params = SamplingParams(temperature=1.0, top_k=1, max_tokens=8, ignore_eos=True)
    assert not params.is_greedy
    tokens, reasons = collect(slots.engine.start(ids, params, NO_STOP))
    assert tokens == {0: greedy_ids(reference_model, ids, 8)}
    assert reasons == {0: "length"}


def test_mixed_sampling_and_greedy_rows_in_one_step(slots, reference_model, tokenizer):
    top_k_1 = SamplingParams(temperature=1.0, top_k=1, max_tokens=10, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, ignore_eos=True)
    greedy = SamplingParams(max_tokens=10, **GREEDY)
    ids_k1 = tokenizer("My favourite food is")["input_ids"]
    ids_sampled = tokenizer("Once upon a time")["input_ids"]
    ids_greedy = tokenizer("The capital of France is")["input_ids"]
    want_k1, want_greedy = greedy_ids(reference_model, ids_k1, 10), greedy_ids(reference_model, ids_greedy, 10)
    slots.steps.clear()
    streams = [slots.engine.start(ids_k1, top_k_1, NO_STOP), slots.engine.start(ids_sampled, sampled, NO_STOP),
               slots.engine.start(ids_greedy, greedy, NO_STOP)]
    (k1, k1_reasons), (drawn, drawn_reasons), (plain, plain_reasons) = [collect(s) for s in streams]
    assert any(set(params) == {top_k_1, sampled, greedy} for _, _, params in slots.steps), \
        "the three requests never decoded in one step"
    assert k1 == {0: want_k1}
    assert plain == {0: want_greedy}
    assert len(drawn[0]) == 10 and all(0 <= t < len(tokenizer) for t in drawn[0])
    assert k1_reasons == drawn_reasons == plain_reasons == {0: "length"}


def test_paused_holds_the_loop_between_steps(slots, reference_model, tokenizer):
    ids = tokenizer("1, 2, 3, 4,")["input_ids"]
    with slots.engine.paused():
        stream = slots.engine.start(ids, SamplingParams(max_tokens=4, **GREEDY), NO_STOP)
        time.sleep(0.5)
        assert stream._updates.empty(), "the loop ran the model while paused"
    tokens, reasons = collect(stream)
    assert tokens == {0: greedy_ids(reference_model, ids, 4)}
    assert reasons == {0: "length"}


def test_can_serve_every_generation_request():
    for params in (SamplingParams(temperature=0.7, top_p=0.9, top_k=5, n=3), SamplingParams(seed=1),
                   SamplingParams(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5),
                   SamplingParams(min_p=0.1, logprobs=5)):
        assert SlotBatching.can_serve(params)


def test_loop_death_fails_open_and_queued_streams_and_refuses_new_ones(reference_model, tokenizer):
    _, model = reference_model
    calls = []
    raised: list[EngineDied] = []
    deaths: list[BaseException] = []

    def on_step():
        calls.append(1)
        if len(calls) == 3:
            raised.append(EngineDied("injected at the third step"))
            raise raised[0]

    engine = SlotBatching(model, 1, 64, cache_bytes=2**30, cuda_graphs=False, on_death=deaths.append,
                          on_step=on_step)
    ids = tokenizer("The capital of France is")["input_ids"]
    open_stream = engine.start(ids, SamplingParams(max_tokens=20, **GREEDY), NO_STOP)
    queued_stream = engine.start(ids, SamplingParams(max_tokens=20, **GREEDY), NO_STOP)  # one slot: it waits
    received = []
    with pytest.raises(RuntimeError, match="loop died"):
        for update in open_stream.updates(deadline=time.monotonic() + 30):
            received.extend(update.token_ids)
    # the prefill's token and two decode steps' tokens were published before the third step raised
    assert received == greedy_ids(reference_model, ids, 3)
    with pytest.raises(RuntimeError, match="loop died"):
        collect(queued_stream, timeout_s=10)
    assert len(deaths) == 1 and deaths[0] is raised[0]
    time.sleep(0.2)
    assert len(deaths) == 1 and len(calls) == 3
    assert engine.running() == 0
    with pytest.raises(RuntimeError, match="loop died"):
        engine.start(ids, SamplingParams(**GREEDY), NO_STOP)


def test_a_thread_whose_cuda_set_up_fails_reports_the_death(reference_model, tokenizer, monkeypatch):
    """The slot loop and the batching thread make their cuBLAS handle as they start (set_up_cuda_thread); where
    that fails, the engine learns of it (on_death: the worker is replaced) instead of a thread ending unseen and its
    requests waiting for nothing."""
    from gunicorn_llm.engines import transformers_slots

    _, model = reference_model
    failure = RuntimeError("CUBLAS_STATUS_ALLOC_FAILED (injected)")

    def fail(device):
        raise failure

    monkeypatch.setattr(transformers_slots, "set_up_cuda_thread", fail)
    monkeypatch.setattr(transformers_generate, "set_up_cuda_thread", fail)
    deaths: list[BaseException] = []
    slots = SlotBatching(model, 1, 64, cache_bytes=2**30, cuda_graphs=False, on_death=deaths.append,
                         on_step=lambda: None)
    transformers_generate.BatchedGenerate(model, tokenizer, 4, beside=None, on_death=deaths.append,
                                          on_step=lambda: None)
    deadline = time.monotonic() + 10
    while len(deaths) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert deaths == [failure, failure]
    with pytest.raises(RuntimeError, match="loop died"):
        slots.start(tokenizer("Hello")["input_ids"], SamplingParams(**GREEDY), NO_STOP)


def test_supports(reference_model, embedded_model_dir):
    config = reference_model[1].config  # as the server passes it: the loaded model's
    assert supports(config, MAX_LEN)
    # A config not attached to a model yet has no attention implementation chosen (None): SDPA by default.
    assert supports(AutoConfig.from_pretrained(embedded_model_dir), MAX_LEN)
    windowed = copy.deepcopy(config)
    windowed.sliding_window = MAX_LEN // 2
    assert not supports(windowed, MAX_LEN)
    windowed.sliding_window = MAX_LEN  # a window holding every sequence is plain causal attention
    assert supports(windowed, MAX_LEN)
    capped = copy.deepcopy(config)
    capped.final_logit_softcapping = 30.0
    assert not supports(capped, MAX_LEN)


def test_cache_budget_sets_the_slots(reference_model):
    _, model = reference_model
    per_slot = SlotCache.bytes_per_token(model.config, torch.float32) * MAX_LEN
    with pytest.raises(RuntimeError, match="--max-model-len"):
        SlotBatching(model, 8, MAX_LEN, per_slot - 1, cuda_graphs=False, on_death=print, on_step=lambda: None)
    engine = SlotBatching(model, 8, MAX_LEN, per_slot * 2, cuda_graphs=False, on_death=print, on_step=lambda: None)
    assert engine.slots == 2
    kv = engine.cache.kv
    assert kv.shape[2] == 2 and kv.shape[4] == MAX_LEN
    assert kv.numel() * kv.element_size() == per_slot * 2  # bytes_per_token is what the cache really takes
    assert SlotBatching(model, 8, MAX_LEN, per_slot * 2 - 1, cuda_graphs=False, on_death=print,
                        on_step=lambda: None).slots == 1
    assert SlotBatching(model, 2, MAX_LEN, per_slot * 5, cuda_graphs=False, on_death=print,
                        on_step=lambda: None).slots == 2  # no more than asked for


# -- every request on the fast path: seeds, logprobs, penalties, min-p; prompt log-probabilities batched -----------



@pytest.fixture(scope="module")
def generate_engine(embedded_model_dir):
    """The transformers engine on its batched-generate path (the CPU default): the reference for what the slot
    engine must answer alike."""
    from gunicorn_llm.engines.transformers_engine import TransformersEngine
    from gunicorn_llm.settings import ServerSettings

    return TransformersEngine(str(embedded_model_dir), "embedded",
                              ServerSettings(BATCHING="generate", MAX_MODEL_LEN=MAX_LEN))


def started_together(slots, streams_params: list[tuple[list[int], SamplingParams]]) -> list:
    """Start every (prompt, params) while the loop is held, so that they are prefilled and decoded together; then
    collect each one's tokens, reasons and logprobs, and check that they shared a decode step."""
    slots.steps.clear()
    with slots.engine.paused():
        streams = [slots.engine.start(ids, params, NO_STOP) for ids, params in streams_params]
    results = []
    for stream in streams:
        logprobs: dict[int, list[TokenLogprob]] = {}
        results.append((*collect(stream, logprobs=logprobs), logprobs))
    everyone = {params for _, params in streams_params}
    assert any(set(step_params) == everyone for _, _, step_params in slots.steps), "they never decoded in one step"
    return results


def test_greedy_with_a_seed_stays_in_the_batch_and_equals_greedy(slots, generate_engine, reference_model, tokenizer,
                                                                 monkeypatch):
    ids = tokenizer("The capital of France is")["input_ids"]
    seeded, plain = SamplingParams(seed=1234, max_tokens=8, **GREEDY), SamplingParams(max_tokens=8, **GREEDY)
    (seeded_tokens, _, _), (plain_tokens, _, _) = started_together(slots, [(ids, seeded), (ids, plain)])
    assert seeded_tokens == plain_tokens == {0: greedy_ids(reference_model, ids, 8)}
    # Through the engine: the seed is dropped on arrival, so the request goes where unseeded greedy ones go.
    from gunicorn_llm.ops import metrics

    paths: list[str] = []
    monkeypatch.setattr(metrics, "engine_path_taken", paths.append)
    monkeypatch.setattr(generate_engine, "paths", [slots.engine, *generate_engine.paths])
    slots.steps.clear()
    tokens, _ = collect(generate_engine.start(ids, seeded))
    assert paths == ["slots"] and tokens == plain_tokens
    assert {params.seed for _, _, step_params in slots.steps for params in step_params} == {None}


def test_seeded_sampling_is_the_same_alone_and_among_others(slots, tokenizer):
    ids = tokenizer("Once upon a time")["input_ids"]
    sampled = {"temperature": 1.0, "top_p": 0.95, "min_p": 0.02, "max_tokens": 12, "ignore_eos": True}
    alone, _ = collect(slots.engine.start(ids, SamplingParams(n=2, seed=7, **sampled), NO_STOP))
    assert alone[0] != alone[1], "choices 0 and 1 drew from the same seed"
    # Choice 0 of n draws from the seed itself: alone as n=1, then beside an unseeded and another seeded row.
    seeded = SamplingParams(seed=7, **sampled)
    mates = [(tokenizer("My favourite food is")["input_ids"], SamplingParams(**sampled)),
             (ids, SamplingParams(seed=8, **sampled))]
    (among, _, _), _, (other_seed, _, _) = started_together(slots, [(ids, seeded), *mates])
    assert among == {0: alone[0]}
    assert other_seed != among


def test_logprobs_equal_the_batched_generate_paths(slots, generate_engine, tokenizer):
    """Same tokens and top alternatives; the numbers within float32 noise (the two paths run attention over
    differently shaped caches: measured up to 1.2e-5 apart)."""
    requests = [  # a sampled row at top-k 1 takes greedy's tokens: its log-probabilities are the model's, untempered
        (tokenizer("The capital of France is")["input_ids"], SamplingParams(logprobs=3, max_tokens=6, **GREEDY)),
        (tokenizer("My favourite food is")["input_ids"],
         SamplingParams(logprobs=0, temperature=0.5, top_k=1, max_tokens=6, ignore_eos=True)),
        (tokenizer("Once upon a time")["input_ids"], SamplingParams(max_tokens=6, **GREEDY)),  # asks for none
    ]
    for (ids, params), (tokens, _, logprobs) in zip(requests, started_together(slots, requests), strict=True):
        want_logprobs: dict[int, list[TokenLogprob]] = {}
        want_tokens, _ = collect(generate_engine.start(ids, params), logprobs=want_logprobs)
        assert tokens == want_tokens
        if params.logprobs is None:
            assert logprobs == {}
            continue
        assert len(logprobs[0]) == 6
        for got, want in zip(logprobs[0], want_logprobs[0], strict=True):
            assert got.token_id == want.token_id and got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert [t for t, _ in got.top] == [t for t, _ in want.top] and len(got.top) == params.logprobs
            assert [lp for _, lp in got.top] == pytest.approx([lp for _, lp in want.top], abs=1e-4)


def test_penalty_rows_equal_the_batched_generate_paths(slots, generate_engine, reference_model, tokenizer):
    ids = tokenizer("1, 2, 3, 4, 1, 2, 3, 4,")["input_ids"]  # greedy repeats it: every penalty changes the answer
    requests = [
        (ids, SamplingParams(repetition_penalty=1.5, max_tokens=10, **GREEDY)),
        (ids, SamplingParams(presence_penalty=1.0, frequency_penalty=0.8, repetition_penalty=0.9, max_tokens=10,
                             **GREEDY)),
        (ids, SamplingParams(max_tokens=10, **GREEDY)),
    ]
    results = started_together(slots, requests)
    plain = greedy_ids(reference_model, ids, 10)
    assert results[-1][0] == {0: plain}
    for (_, params), (tokens, _, _) in zip(requests[:-1], results, strict=False):
        want, _ = collect(generate_engine.start(ids, params))
        assert tokens == want and tokens[0] != plain, params


def test_sampling_transforms_equal_transformers_warpers():
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from gunicorn_llm.engines.transformers_sampling import RowSampler

    rows = [SimpleNamespace(params=params, generator=None) for params in (
        SamplingParams(temperature=0.7, min_p=0.1),
        SamplingParams(temperature=1.3, top_k=40, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=0.9, top_k=5, min_p=0.3),
    )]
    logits = torch.randn(len(rows), 512, generator=torch.Generator().manual_seed(0)) * 3
    probs, order = RowSampler(logits.shape[1], logits.device).sorted_distribution(logits, rows)
    got = torch.zeros_like(logits).scatter_(-1, order, probs)
    for row, (scores, params) in enumerate(zip(logits, (row.params for row in rows), strict=True)):
        scores = TemperatureLogitsWarper(params.temperature)(None, scores[None])
        for warper, active in ((TopKLogitsWarper(max(params.top_k, 1)), params.top_k > 0),
                               (TopPLogitsWarper(params.top_p), params.top_p < 1.0),
                               (MinPLogitsWarper(params.min_p), params.min_p > 0.0)):
            scores = warper(None, scores) if active else scores
        want = scores.softmax(dim=-1)[0]
        assert torch.equal(got[row] > 0, want > 0), f"row {row} keeps other tokens"
        assert torch.allclose(got[row] / got[row].sum(), want, atol=1e-6), f"row {row}"


def test_prompt_logprobs_of_many_requests_share_forward_passes(slots, generate_engine, reference_model, tokenizer,
                                                               monkeypatch):
    """Requests that wait together are scored together, each prompt equal to a plain forward pass of it alone."""
    from conftest import direct_prompt_logprobs

    texts = ["The capital of France is Paris.", "1, 2, 3, 4, 5", "Once upon a time there was a printing press.",
             "Question: what is 7 times 8?\nAnswer: 56", "My favourite food is", TEXT[:200], "Hi there"]
    requests = [[texts[i % len(texts)], texts[(i + 3) % len(texts)]] for i in range(8)]
    passes: list[tuple[int, int]] = []
    hook = generate_engine.model.register_forward_hook(lambda module, args, kwargs, output: passes.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    # The batching thread pauses the continuous path while it scores: with the slot engine held, the first request
    # is taken and waits, the others queue meanwhile.
    monkeypatch.setattr(generate_engine.generate, "beside", slots.engine)
    # No gathering window (tests/test_scoring.py): the first request is scored before the others arrive.
    monkeypatch.setattr(transformers_generate, "take_arriving", lambda jobs, **window: [])
    results: list = [None] * len(requests)

    def score(index: int) -> None:
        prompts = [tokenizer(text)["input_ids"] for text in requests[index]]
        results[index] = generate_engine.prompt_logprobs(prompts, top=2 if index % 2 else 0)

    threads = [threading.Thread(target=score, args=(index,)) for index in range(len(requests))]
    jobs = generate_engine.generate._jobs
    queued_before = jobs.unfinished_tasks  # counts every put (nobody calls task_done)
    try:
        with slots.engine.paused():
            threads[0].start()
            assert wait_until(lambda: jobs.unfinished_tasks == queued_before + 1 and jobs.empty())
            for thread in threads[1:]:
                thread.start()
            assert wait_until(lambda: jobs.qsize() == len(requests) - 1)
        for thread in threads:
            thread.join(60)
    finally:
        hook.remove()
    # the first request's two prompts, then every distinct prompt of the others once
    assert [rows for rows, _ in passes] == [2, len(texts)], passes
    for index, (texts_of_request, scores) in enumerate(zip(requests, results, strict=True)):
        for text, scored in zip(texts_of_request, scores, strict=True):
            want = direct_prompt_logprobs(reference_model, text)
            assert [entry.token_id for entry in scored] == tokenizer(text)["input_ids"][1:]
            assert [entry.logprob for entry in scored] == pytest.approx(want.tolist(), **FLOAT32_SCORING)
            assert all(len(entry.top) == (2 if index % 2 else 0) for entry in scored)


def test_prompt_logprobs_within_a_small_token_budget_equal_unbatched(generate_engine, reference_model, tokenizer):
    from conftest import direct_prompt_logprobs
    from gunicorn_llm.engines.transformers_scoring import ScoreJob, score_jobs

    texts = ["The capital of France is Paris.", TEXT[:300], "1, 2, 3", "Hi", TEXT[:120]]
    jobs = [ScoreJob([tokenizer(text)["input_ids"] for text in texts[:3]], 1),
            ScoreJob([tokenizer(text)["input_ids"] for text in texts[3:]], 0)]
    score_jobs(generate_engine.model, tokenizer.pad_token_id, jobs, token_budget=64)
    scores = jobs[0].result.result(0) + jobs[1].result.result(0)
    for text, scored in zip(texts, scores, strict=True):
        assert [entry.logprob for entry in scored] == pytest.approx(
            direct_prompt_logprobs(reference_model, text).tolist(), **FLOAT32_SCORING)


@pytest.mark.parametrize("batching", ["slots", "continuous", "generate"])
def test_each_batching_path_hands_a_stream_over_in_chunks_of_the_stream_interval(embedded_model_dir, reference_model,
                                                                                 tokenizer, batching):
    from gunicorn_llm.engines.transformers_engine import TransformersEngine
    from gunicorn_llm.settings import ServerSettings

    engine = TransformersEngine(str(embedded_model_dir), "embedded", ServerSettings(
        BATCHING=batching, MAX_MODEL_LEN=MAX_LEN, STREAM_INTERVAL=3))
    prompt = tokenizer("1, 2, 3, 4,")["input_ids"]
    try:
        stream = engine.start(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        handed_over = [stream._updates.get(timeout=60)]  # straight from the queue: a late reader would merge them
        while handed_over[-1].finish_reason is None:
            handed_over.append(stream._updates.get(timeout=60))
    finally:
        engine.close()
    assert [len(update.token_ids) for update in handed_over] == [1, 3, 3, 1]
    assert sum((update.token_ids for update in handed_over), []) == greedy_ids(reference_model, prompt, 8)

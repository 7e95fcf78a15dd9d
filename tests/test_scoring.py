"""`transformers_scoring.score_jobs` driven directly (no server), and the engine's one-token answers after scoring,
on the embedded model in float32 on CPU.

Covered: prompts sharing a context (a question's options) and a few-shot prefix (every question's) run the shared
tokens once, and every prompt's log-probabilities and top alternatives equal one forward pass of it alone; the same
within a token budget small enough to split every level over several passes, and with sharing off (a model whose
attention is not plain causal); duplicate prompts, a prompt that is another's prefix, a one-token prompt and jobs
asking for different numbers of alternatives; a failing pass fails only the jobs with prompts in it; a pass out of
memory runs in halves, and only a prompt that cannot run alone fails (EngineBusy); a question's options packed after
its context run in one row of one pass, and over its cache when that row runs out of memory; the batching thread's
short wait for the rest of a burst, no longer than its last round took; workers sharing a GPU split its free
memory; a failing round of the batching thread fails its requests and the thread goes on. Through the engine: a
greedy one-token generation of a scored prompt is answered without a forward pass and equals plain `generate`'s
token and log-probabilities; other requests still generate.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import FLOAT32_SCORING
from gunicorn_llm.engines import transformers_scoring
from gunicorn_llm.engines.transformers_scoring import NextTokens, ScoreJob, score_jobs, take_arriving
from gunicorn_llm.request_schema import SamplingParams

FEWSHOT = ("Question: Which planet is closest to the sun?\nAnswer: Mercury\n\n"
           "Question: What do bees make?\nAnswer: honey\n\n"
           "Question: How many legs does a spider have?\nAnswer: eight\n\n")
QUESTIONS = {
    "Question: Which metal is liquid at room temperature?\nAnswer:": [" mercury", " iron", " gold", " tin"],
    "Question: What is the largest ocean on Earth, by area and by volume?\nAnswer:": [" the Pacific", " the Arctic"],
    "Question: Who wrote the play Hamlet?\nAnswer:": [" William Shakespeare", " Christopher Marlowe", " Ben Jonson"],
}


@pytest.fixture(scope="module")
def tokenizer(reference_model):
    return reference_model[0]


@pytest.fixture(scope="module")
def model(reference_model):
    return reference_model[1]


def alone(model, ids: list[int]) -> torch.Tensor:
    """Log-probabilities over the vocabulary at every position of one prompt's own forward pass."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_equal_alone(model, ids: list[int], scored, top: int) -> None:
    want = alone(model, ids)
    assert [entry.token_id for entry in scored] == ids[1:]
    assert [entry.logprob for entry in scored] == pytest.approx(
        want[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist(), **FLOAT32_SCORING)
    for position, entry in enumerate(scored):
        values, top_ids = want[position].topk(top)
        assert [token for token, _ in entry.top] == top_ids.tolist(), position
        assert [value for _, value in entry.top] == pytest.approx(values.tolist(), **FLOAT32_SCORING)


def eval_prompts(tokenizer) -> list[list[int]]:
    """Each question's options after it, after the few-shot examples; and one question without them."""
    prompts = [tokenizer(FEWSHOT + question + option)["input_ids"]
               for question, options in QUESTIONS.items() for option in options]
    question, options = next(iter(QUESTIONS.items()))
    return prompts + [tokenizer(question + option)["input_ids"] for option in options[:2]]


class Passes:
    """The input shapes of the model's forward passes, and the cache length each ran over."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int, int]] = []
        self.new_tokens = 0  # not counting padding
        self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        rows, width = kwargs["input_ids"].shape
        self.shapes.append((rows, width, cache.get_seq_length() if cache is not None else 0))
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:  # rows with packed leaves: a real position sees itself
            mask = mask[:, 0, :, -width:].diagonal(dim1=-2, dim2=-1)
        self.new_tokens += rows * width if mask is None else int(mask[:, -width:].sum())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hook.remove()


@contextlib.contextmanager
def out_of_memory_when(model, monkeypatch, failing):
    """The model's forward passes whose arguments `failing` picks run out of memory (as on a GPU), within the block."""
    forward = model.forward

    def simulated(*args, **kwargs):
        if failing(kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", simulated)
    yield
    monkeypatch.undo()


@pytest.mark.parametrize("budget", [transformers_scoring.SCORING_TOKEN_BUDGET, 64])
def test_shared_contexts_run_once_and_every_prompt_equals_its_own_pass(model, tokenizer, budget):
    prompts = eval_prompts(tokenizer)
    jobs = [ScoreJob([ids], top=index % 3) for index, ids in enumerate(prompts)]
    with Passes(model) as passes:
        score_jobs(model, tokenizer.pad_token_id, jobs, token_budget=budget)
    # The few-shot examples ran once (not once per prompt), the first question once (not once per option).
    shots, first_question = len(tokenizer(FEWSHOT)["input_ids"]), len(tokenizer(next(iter(QUESTIONS)))["input_ids"])
    with_shots = sum(map(len, QUESTIONS.values()))
    assert passes.new_tokens <= sum(map(len, prompts)) - (with_shots - 1) * shots - 3 * first_question, passes.shapes
    assert any(cached for _, _, cached in passes.shapes)
    if budget == 64:
        assert all(rows * width <= 64 or rows == 1 for rows, width, _ in passes.shapes), passes.shapes
    for job, ids in zip(jobs, prompts, strict=True):
        assert_equal_alone(model, ids, job.result.result(0)[0], job.top)


def question_prompts(tokenizer) -> list[list[int]]:
    """Each question's options after it, without shared examples."""
    return [tokenizer(question + option)["input_ids"] for question, options in QUESTIONS.items() for option in options]


def test_a_context_and_its_options_run_in_one_row_of_one_pass(model, tokenizer):
    """A question's options are packed after its context in one row: one pass for all the questions, no cache kept
    or gathered, and every option equal to its own pass."""
    prompts = question_prompts(tokenizer)
    jobs = [ScoreJob([ids], top=index % 3) for index, ids in enumerate(prompts)]
    with Passes(model) as passes:
        score_jobs(model, tokenizer.pad_token_id, jobs)
    ((rows, _, cached),) = passes.shapes
    assert rows < len(prompts) and cached == 0 and passes.new_tokens < sum(map(len, prompts))
    for job, ids in zip(jobs, prompts, strict=True):
        assert_equal_alone(model, ids, job.result.result(0)[0], job.top)


def test_a_packed_row_out_of_memory_runs_its_options_over_its_cache(model, tokenizer, monkeypatch):
    prompts = question_prompts(tokenizer)
    jobs = [ScoreJob([ids], top=1) for ids in prompts]
    with out_of_memory_when(model, monkeypatch, lambda kwargs: kwargs["attention_mask"].dim() == 4), \
            Passes(model) as passes:
        score_jobs(model, tokenizer.pad_token_id, jobs)
    assert any(cached for *_, cached in passes.shapes)
    for job, ids in zip(jobs, prompts, strict=True):
        assert_equal_alone(model, ids, job.result.result(0)[0], 1)


def test_duplicates_prefixes_and_single_tokens_in_one_batch(model, tokenizer):
    prompts = eval_prompts(tokenizer)
    context = tokenizer(FEWSHOT + next(iter(QUESTIONS)))["input_ids"]  # the others' prefix, itself a prompt
    jobs = [ScoreJob([prompts[0], context, prompts[1]], top=2), ScoreJob([prompts[1], [context[0]]], top=0),
            ScoreJob([prompts[0]], top=5)]
    score_jobs(model, tokenizer.pad_token_id, jobs)
    first, second, third = (job.result.result(0) for job in jobs)
    for ids, scored in zip([prompts[0], context, prompts[1]], first, strict=True):
        assert_equal_alone(model, ids, scored, 2)
    assert_equal_alone(model, prompts[1], second[0], 0)
    assert second[1] == []
    assert_equal_alone(model, prompts[0], third[0], 5)


def test_without_sharing_every_prompt_runs_alone(model, tokenizer, monkeypatch):
    """A model whose attention is not plain causal (sliding windows, soft-capping) gets one row per prompt."""
    monkeypatch.setattr(transformers_scoring, "supports", lambda config, length: False)
    prompts = eval_prompts(tokenizer)
    jobs = [ScoreJob([ids], top=1) for ids in prompts]
    with Passes(model) as passes:
        score_jobs(model, tokenizer.pad_token_id, jobs)
    assert passes.new_tokens == sum(map(len, prompts)) and not any(cached for *_, cached in passes.shapes)
    for job, ids in zip(jobs, prompts, strict=True):
        assert_equal_alone(model, ids, job.result.result(0)[0], 1)


def test_a_failing_pass_fails_only_the_jobs_in_it(model, tokenizer, monkeypatch):
    prompts = eval_prompts(tokenizer)
    short = tokenizer("Hi there, how are you?")["input_ids"]
    jobs = [ScoreJob(prompts[:2], top=0), ScoreJob([short], top=0)]
    forward = model.forward

    def failing_on_long_rows(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > len(short):
            raise RuntimeError("out of memory")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing_on_long_rows)
    score_jobs(model, tokenizer.pad_token_id, jobs, token_budget=len(short))
    with pytest.raises(RuntimeError, match="out of memory"):
        jobs[0].result.result(0)
    monkeypatch.undo()
    assert_equal_alone(model, short, jobs[1].result.result(0)[0], 0)


def test_out_of_memory_splits_the_pass_and_fails_only_what_cannot_run_alone(model, tokenizer, monkeypatch):
    """A pass that runs out of memory runs in halves, down to one segment: with room for 128 new tokens a pass, every
    prompt is scored (equal to its own pass) except the one too long to run alone, whose job alone gets EngineBusy;
    the next batch scores it once the memory is there."""
    from gunicorn_llm.engines.base import EngineBusy

    room = 128
    prompts = eval_prompts(tokenizer)
    long = tokenizer("Once upon a time, in a land far away, " * 20)["input_ids"]
    assert len(long) > room >= max(map(len, prompts)) - len(tokenizer(FEWSHOT)["input_ids"])
    jobs = [ScoreJob([ids], top=1) for ids in prompts] + [ScoreJob([long], top=1)]
    with out_of_memory_when(model, monkeypatch, lambda kwargs: kwargs["input_ids"].numel() > room), \
            Passes(model) as passes:
        score_jobs(model, tokenizer.pad_token_id, jobs)
    assert any(rows * width > room for rows, width, _ in passes.shapes)  # tried whole first, then split
    for job, ids in zip(jobs, prompts, strict=False):
        assert_equal_alone(model, ids, job.result.result(0)[0], 1)
    with pytest.raises(EngineBusy, match="out of memory scoring"):
        jobs[-1].result.result(0)
    again = ScoreJob([long], top=1)
    score_jobs(model, tokenizer.pad_token_id, [again])
    assert_equal_alone(model, long, again.result.result(0)[0], 1)


def test_workers_sharing_a_gpu_plan_with_their_share_of_its_free_memory(monkeypatch):
    """With --workers-per-gpu K, each worker's passes may run beside the others': a pass plans with a Kth of the
    device's free memory, plus whatever its own allocator holds unused (that is no other worker's), and never past
    the worker's share of the device (--gpu-memory-utilization over K): the rest is other servers' and the CUDA
    libraries' own."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * gib)
    monkeypatch.setattr(transformers_scoring, "_device_share", transformers_scoring._DeviceShare())
    gpu = torch.device("cuda", 0)
    assert transformers_scoring.free_device_bytes(gpu) == 9 * gib
    transformers_scoring.share_device_memory(4, 1.0)
    assert transformers_scoring.free_device_bytes(gpu) == 3 * gib  # 8 / 4 free, 1 held unused
    transformers_scoring.share_device_memory(1, 0.1)
    assert transformers_scoring.free_device_bytes(gpu) == 6 * gib  # its share, 8, less the 2 it holds
    assert transformers_scoring.free_device_bytes(torch.device("cpu")) is None


@pytest.fixture(scope="module")
def engine(embedded_model_dir):
    from gunicorn_llm.engines.transformers_engine import TransformersEngine
    from gunicorn_llm.settings import ServerSettings

    return TransformersEngine(str(embedded_model_dir), "embedded", ServerSettings(BATCHING="generate"))


def test_the_slots_leave_scoring_passes_their_room_within_the_share(engine, monkeypatch):
    """Scoring passes stay within the worker's share of the GPU, so the slots' cache leaves them room: a whole
    pass's where the share allows, half of what the weights leave where it does not, never less than the activations'
    headroom."""
    from types import SimpleNamespace

    from gunicorn_llm.engines.transformers_engine import ACTIVATION_HEADROOM_BYTES, TransformersEngine
    from gunicorn_llm.settings import ServerSettings

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 * gib)  # the weights
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0), model=engine.model)
    whole_pass = transformers_scoring.full_pass_bytes(engine.model)
    assert ACTIVATION_HEADROOM_BYTES < whole_pass < 30 * gib

    def cache_bytes(utilization: float, workers: int = 1) -> int:
        settings = ServerSettings(GPU_MEMORY_UTILIZATION=utilization, WORKERS_PER_GPU=workers)
        return TransformersEngine._slot_cache_bytes(on_gpu, settings)

    assert cache_bytes(0.9) == int(0.9 * 80 * gib - 4 * gib) - whole_pass
    assert cache_bytes(0.1) == 2 * gib  # 8 of the GPU's 80, 4 of them weights: half of the rest
    assert cache_bytes(0.2, workers=3) == int(0.2 * 80 * gib / 3 - 4 * gib) - ACTIVATION_HEADROOM_BYTES


def test_a_pass_is_planned_by_what_its_rows_hold(engine, monkeypatch):
    """On a GPU a pass's rows are planned in bytes: contexts with no cache to gather hold only their logits and keys
    and values, so a pass takes several times more of them than of rows that each gather a long shared prefix."""
    assert transformers_scoring.pass_budget(engine.model) == transformers_scoring.PassBudget.of_tokens(
        transformers_scoring.SCORING_TOKEN_BUDGET)  # on CPU: tokens only
    new_token, cached_token = transformers_scoring._token_bytes(engine.model)
    room = 1000 * new_token  # the pass's share of the free memory: 1,000 new tokens of contexts
    monkeypatch.setattr(transformers_scoring, "free_device_bytes",
                        lambda device: int(room / transformers_scoring.SCORING_MEMORY_SHARE))
    budget = transformers_scoring.pass_budget(engine.model)
    assert budget.fits(2, 500, 0) and not budget.fits(3, 500, 0)
    option_rows = room // (8 * new_token + 500 * cached_token)  # 8-token options over a 500-token context
    assert option_rows >= 1
    assert budget.fits(option_rows, 8, 500) and not budget.fits(option_rows + 1, 8, 500)


def test_one_greedy_token_after_scoring_needs_no_pass(engine, reference_model, tokenizer, monkeypatch):
    from gunicorn_llm.ops import metrics
    from test_slot_batching import collect, greedy_ids

    prompts = eval_prompts(tokenizer)[:3]
    engine.prompt_logprobs(prompts, top=1)
    paths: list[str] = []
    monkeypatch.setattr(metrics, "engine_path_taken", paths.append)
    with Passes(engine.model) as passes:
        answers = []
        for ids in prompts:
            logprobs: dict = {}
            tokens, reasons = collect(engine.start(ids, SamplingParams(temperature=0, max_tokens=1, logprobs=3, n=2,
                                                                       seed=1234)), logprobs=logprobs)
            answers.append((tokens, reasons, logprobs))
    assert passes.shapes == [] and paths == ["scored"] * 3
    for ids, (tokens, reasons, logprobs) in zip(prompts, answers, strict=True):
        want = alone(engine.model, ids)[-1]
        values, top_ids = want.topk(3)
        assert tokens == {0: greedy_ids(reference_model, ids, 1), 1: greedy_ids(reference_model, ids, 1)}
        assert set(reasons.values()) == {"length"}
        entry = logprobs[0][0]
        assert entry.token_id == top_ids[0].item() and [t for t, _ in entry.top] == top_ids.tolist()
        assert [entry.logprob] + [v for _, v in entry.top] == pytest.approx([values[0].item(), *values.tolist()],
                                                                            **FLOAT32_SCORING)


def test_other_requests_after_scoring_still_generate(engine, reference_model, tokenizer, monkeypatch):
    from gunicorn_llm.ops import metrics
    from test_slot_batching import collect, greedy_ids

    ids = eval_prompts(tokenizer)[0]
    engine.prompt_logprobs([ids])
    paths: list[str] = []
    monkeypatch.setattr(metrics, "engine_path_taken", paths.append)
    for params in (SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=1, repetition_penalty=1.3),
                   SamplingParams(temperature=0.8, max_tokens=1, seed=3),
                   SamplingParams(temperature=0, max_tokens=1, logprobs=20)):
        tokens, _ = collect(engine.start(ids, params))
        if params.max_tokens == 2:
            assert tokens == {0: greedy_ids(reference_model, ids, 2)}
    assert paths == ["generate", "generate", "generate", "scored"]


def test_a_constrained_token_after_scoring_is_generated_under_its_grammar(engine, tokenizer, monkeypatch):
    from gunicorn_llm.ops import metrics
    from gunicorn_llm.request_schema import StructuredOutputs
    from test_slot_batching import collect

    ids = eval_prompts(tokenizer)[1]
    engine.prompt_logprobs([ids])
    paths: list[str] = []
    monkeypatch.setattr(metrics, "engine_path_taken", paths.append)
    choice = StructuredOutputs(choice=["zebra"])
    tokens, _ = collect(engine.start(ids, SamplingParams(temperature=0, max_tokens=1, structured_outputs=choice)))
    assert paths == ["generate"]  # the scored next token knows nothing of the grammar
    (token,) = tokens[0]
    assert "zebra".startswith(tokenizer.decode([token])), tokenizer.decode([token])  # the grammar's, in any split


def test_a_failing_round_fails_its_requests_and_the_batching_thread_goes_on(engine, tokenizer, monkeypatch):
    """A fault outside any forward pass (planning, say) fails the requests of that round; the next are scored."""
    from gunicorn_llm.engines import transformers_generate

    ids = eval_prompts(tokenizer)[0]

    def broken(*args, **kwargs):
        raise ValueError("a planning fault")

    monkeypatch.setattr(transformers_generate, "score_jobs", broken)
    with pytest.raises(ValueError, match="a planning fault"):
        engine.prompt_logprobs([ids], deadline=time.monotonic() + 30)
    monkeypatch.undo()
    (scored,) = engine.prompt_logprobs([ids], top=1, deadline=time.monotonic() + 30)
    assert_equal_alone(engine.model, ids, scored, 1)


def test_the_gathering_window_lasts_no_longer_than_the_last_round(engine, tokenizer, monkeypatch):
    """The wait for the rest of a burst is capped by how long the worker's last round of scoring took (on a GPU, tens
    of milliseconds), and by GATHER_MAX_S. Rounds of 30 ms on a clock of the test's own stand in for the passes here,
    so that a busy machine cannot stretch them."""
    from gunicorn_llm.engines import transformers_generate

    windows: list[float] = []
    clock = [0.0]

    def round_of_30_ms(model, pad_token_id, jobs):
        clock[0] += 0.03
        for job in jobs:
            job.result.set_result([[] for _ in job.prompts])

    monkeypatch.setattr(transformers_generate, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(transformers_generate, "take_arriving", lambda jobs, max_s: windows.append(max_s) or [])
    monkeypatch.setattr(transformers_generate, "score_jobs", round_of_30_ms)
    monkeypatch.setattr(engine.generate, "_last_scoring_s", transformers_scoring.GATHER_MAX_S)
    ids = eval_prompts(tokenizer)[0]
    for _ in range(2):
        engine.prompt_logprobs([ids], deadline=time.monotonic() + 30)
    assert windows == [transformers_scoring.GATHER_MAX_S, pytest.approx(0.03)]


def test_next_tokens_keep_the_latest_prompts():
    memo = NextTokens(capacity=2)
    for token in range(3):
        memo.remember([1, 2, token], [token], [-0.5])
    greedy = SamplingParams(temperature=0, max_tokens=1)
    assert memo.answer([1, 2, 0], greedy, frozenset()) is None
    stream = memo.answer([1, 2, 2], greedy, frozenset({2}))
    assert [(update.token_ids, update.finish_reason) for update in stream] == [([2], "stop")]


def test_jobs_arriving_close_behind_join_the_batch():
    jobs: queue.Queue = queue.Queue()

    def arrive(gaps_s: list[float]) -> None:
        for index, gap in enumerate(gaps_s):
            time.sleep(gap)
            jobs.put(index)

    sender = threading.Thread(target=arrive, args=([0.002, 0.002, 0.002, 0.3],))
    sender.start()
    assert take_arriving(jobs, gap_s=0.1, max_s=1.0) == [0, 1, 2]  # the fourth came after a 0.3 s gap
    sender.join()
    started = time.monotonic()
    sender = threading.Thread(target=arrive, args=([0.0] + [0.04] * 10,))
    sender.start()
    assert len(take_arriving(jobs, gap_s=0.1, max_s=0.2)) < 10 and time.monotonic() - started < 0.35  # no longer
    sender.join()

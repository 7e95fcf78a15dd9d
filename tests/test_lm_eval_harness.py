"""lm-evaluation-harness as a real client of both engines: the same results as its in-process `hf` model.

A small local task pair is written into a temporary folder (data as JSON files, task YAML with `dataset_path: json`;
nothing comes from the hub): a multiple-choice task (log-likelihoods of each choice) and a generate-until task (greedy,
a stop string, a few tokens). `lm_eval.simple_evaluate` runs them through `local-completions` (log-likelihoods with
`echo`/`logprobs`, and generation; it finds /tokenizer_info and /tokenize and uses the server's tokenizer) and the
generate-until task through `local-chat-completions` (the server's chat template), against one real server per
engine; and through lm-eval's `hf` model on the same weights in float32, in this process. Accuracy must be equal,
every per-choice log-likelihood within 1e-4, every generation identical. lm-eval sends `"seed": 1234` with each
request, as it does against any server.
"""

from __future__ import annotations

import json

import pytest
import requests

MODEL = "SmolLM2-135M-Instruct"
LOGLIKELIHOOD_TOLERANCE = 1e-4
CONCURRENT_REQUESTS = 4  # lm-eval's num_concurrent: the server batches the harness' requests as it would in a real run

pytestmark = pytest.mark.timeout(480)

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Rome", "Berlin"], 0),
    ("Which animal barks?", ["A cat", "A dog", "A fish", "A bird"], 1),
    ("What color is the sky on a clear day?", ["Green", "Red", "Blue", "Yellow"], 2),
    ("How many legs does a spider have?", ["Six", "Four", "Ten", "Eight"], 3),
    ("What do bees make?", ["Milk", "Honey", "Silk", "Wax paper"], 1),
    ("Which planet is closest to the Sun?", ["Mercury", "Venus", "Mars", "Jupiter"], 0),
]
# Targets with the space a continuation starts with: greedy, the model gets the first two right (exact match 0.5).
PROMPTS = [
    ("The capital of France is", " Paris"),
    ("1, 2, 3, 4,", " 5, 6, 7"),
    ("Once upon a time", " there"),
    ("Q: What is 2 + 2?\nA:", " 4"),
]

TASKS = {
    "tiny_choice": {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc"}],
    },
    "tiny_generation": {
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False, "temperature": 0.0},
        "metric_list": [{"metric": "exact_match"}],
    },
}


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    """The two tasks in a folder of their own. The hub stays offline for this module: nothing is fetched."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield _write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


def _write_tasks(folder):
    from lm_eval.tasks import TaskManager

    rows = {
        "tiny_choice": [{"question": q, "choices": choices, "answer": answer} for q, choices, answer in QUESTIONS],
        "tiny_generation": [{"prompt": prompt, "answer": answer} for prompt, answer in PROMPTS],
    }
    for name, config in TASKS.items():
        data = folder / f"{name}.json"
        data.write_text("\n".join(json.dumps(row) for row in rows[name]) + "\n")
        # YAML is a superset of JSON: the task file is written with json.dumps.
        (folder / f"{name}.yaml").write_text(json.dumps({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **config,
        }))
    return TaskManager(include_path=str(folder), include_defaults=False)


def evaluate(task_manager, model, tasks: list[str], model_args: dict | None = None, chat: bool = False) -> dict:
    """Per task: its metric and each document's responses, from one `simple_evaluate` run."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=task_manager,
                              num_fewshot=0, apply_chat_template=chat, log_samples=True, bootstrap_iters=0)
    metric = {"tiny_choice": "acc,none", "tiny_generation": "exact_match,none"}
    return {task: {"metric": results["results"][task][metric[task]],
                   "responses": {sample["doc_id"]: sample["filtered_resps"] for sample in results["samples"][task]}}
            for task in tasks}


@pytest.fixture(scope="module")
def reference(task_manager, embedded_model_dir):
    """lm-eval's in-process `hf` model on the served weights, in float32 (as both engines run on CPU)."""
    from lm_eval.models.huggingface import HFLM

    model = HFLM(pretrained=str(embedded_model_dir), dtype="float32", device="cpu", batch_size=1)
    return {"completions": evaluate(task_manager, model, ["tiny_choice", "tiny_generation"]),
            "chat": evaluate(task_manager, model, ["tiny_generation"], chat=True)}


def test_local_completions_equal_the_hf_model(engine_server, task_manager, reference):
    served = evaluate(task_manager, "local-completions", ["tiny_choice", "tiny_generation"], {
        "model": MODEL, "base_url": f"{engine_server.url}/v1/completions", "num_concurrent": CONCURRENT_REQUESTS,
        "max_retries": 1})
    expected = reference["completions"]

    choices, hf_choices = served["tiny_choice"], expected["tiny_choice"]
    assert choices["metric"] == hf_choices["metric"]
    assert choices["responses"].keys() == hf_choices["responses"].keys() == set(range(len(QUESTIONS)))
    for doc, hf_scores in hf_choices["responses"].items():
        scores = choices["responses"][doc]
        assert len(scores) == len(hf_scores) == 4
        for (loglikelihood, greedy), (hf_loglikelihood, hf_greedy) in zip(scores, hf_scores, strict=True):
            assert abs(loglikelihood - hf_loglikelihood) <= LOGLIKELIHOOD_TOLERANCE, (doc, scores, hf_scores)
            assert greedy == hf_greedy, (doc, scores, hf_scores)

    assert served["tiny_generation"] == expected["tiny_generation"]
    assert expected["tiny_generation"]["metric"] == 0.5
    # The harness found vLLM's tokenizer routes here and tokenized with the server's tokenizer.
    routes = [json.loads(line)["route"] for line in engine_server.log().splitlines() if line.startswith('{"')]
    assert {"/tokenizer_info", "/tokenize"} <= set(routes)


def test_local_chat_completions_equal_the_hf_model_with_its_chat_template(engine_server, task_manager, reference):
    served = evaluate(task_manager, "local-chat-completions", ["tiny_generation"], {
        "model": MODEL, "base_url": f"{engine_server.url}/v1/chat/completions",
        "num_concurrent": CONCURRENT_REQUESTS, "max_retries": 1}, chat=True)
    assert served == reference["chat"]
    assert requests.get(f"{engine_server.url}/ready", timeout=30).json()["running"] == 0

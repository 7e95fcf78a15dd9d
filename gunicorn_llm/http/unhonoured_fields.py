"""The OpenAI and vLLM request fields this server does not honour yet: a request that sets one gets a 400 naming it.
On the OpenAI routes these are fields of vLLM's request models; on /infer (its `params`) and /generate, fields of
vLLM's SamplingParams.

An OpenAI-compatible server that accepts such a field and answers 200 without acting on it misleads its client
(an evaluation then scores an unconstrained answer as if it were constrained, a tool call that never came as plain
text). So each field of vLLM's request models that the routes do not implement is listed here with the values that
change nothing (sent by clients that spell out defaults) and why it is refused. Keys that neither OpenAI nor vLLM
define keep vLLM's behaviour: ignored with a warning (http/common.py). tests/test_openai_api.py checks that every
field of vLLM's installed request models is either honoured by the routes' models or listed here, on both engines;
tests/test_http_inprocess.py that none is both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gunicorn_llm.request_schema import RequestError


@dataclass(frozen=True)
class Unhonoured:
    why: str
    no_op: tuple = (None,)  # values that ask for nothing (the field's default), accepted


# vLLM's older spelling of structured outputs, gone from its request models: refused rather than mapped, so a client
# learns the spelling both servers take
_GUIDED = "vLLM's guided_* fields are gone (vLLM removed them too); use structured_outputs or response_format"
_FUNCTIONS = "the deprecated `functions` and `function_call` are not supported; use `tools` and `tool_choice`"
_SAMPLING = "this sampling control is not supported by this server yet"
_MULTIMODAL = "this server serves text models only"
_VLLM_INTERNAL = "this vLLM extension is not supported by this server"

# Fields of both /v1/completions and /v1/chat/completions.
_SHARED = {
    "guided_json": Unhonoured(_GUIDED),
    "guided_regex": Unhonoured(_GUIDED),
    "guided_choice": Unhonoured(_GUIDED),
    "guided_grammar": Unhonoured(_GUIDED),
    "use_beam_search": Unhonoured("beam search is not supported (vLLM's server has deprecated it too)", (None, False)),
    "length_penalty": Unhonoured("length_penalty applies to beam search only, which is not supported",
                                 (None, 1, 1.0)),
    "watermarking": Unhonoured(_SAMPLING),
    "repetition_detection": Unhonoured(_SAMPLING),
    "logprob_token_ids": Unhonoured("log-probabilities of chosen token ids are not supported yet"),
    "include_stop_str_in_output": Unhonoured("stop strings are always left out of the text here", (None, False)),
    "spaces_between_special_tokens": Unhonoured("special tokens are always decoded with spaces between them here",
                                                (None, True)),
    "truncate_prompt_tokens": Unhonoured("prompts are never truncated here: a prompt too long is refused"),
    "truncation_side": Unhonoured("prompts are never truncated here: a prompt too long is refused"),
    "priority": Unhonoured("request priorities are not supported: requests are served in arrival order", (None, 0)),
    "stream_interval": Unhonoured("the stream interval is a server setting here (--stream-interval)"),
    "thinking_token_budget": Unhonoured("reasoning controls are not supported by this server yet"),
    "return_tokens_as_token_ids": Unhonoured(_VLLM_INTERNAL, (None, False)),
    "return_token_ids": Unhonoured(_VLLM_INTERNAL, (None, False)),
    "return_token_offsets": Unhonoured(_VLLM_INTERNAL, (None, False)),
    "routed_experts_prompt_start": Unhonoured(_VLLM_INTERNAL, (None, 0)),
    "session_id": Unhonoured(_VLLM_INTERNAL),
    "cache_salt": Unhonoured(_VLLM_INTERNAL),
    "kv_transfer_params": Unhonoured(_VLLM_INTERNAL),
    "ec_transfer_params": Unhonoured(_VLLM_INTERNAL),
    "vllm_xargs": Unhonoured(_VLLM_INTERNAL),
    "mm_payload": Unhonoured(_MULTIMODAL, (None, "tensors")),
    "return_mm_kwargs": Unhonoured(_MULTIMODAL, (None, False)),
}

# vLLM's SamplingParams fields that /infer's `params` and /generate do not honour: today's, and the older ones of the
# vLLM that UltraEval's server handed its params to (best_of, beam search); and transformers' beam search (num_beams)
_SAMPLING_PARAMS = {
    **{key: _SHARED[key] for key in (
        "use_beam_search", "length_penalty", "watermarking", "repetition_detection", "logprob_token_ids",
        "include_stop_str_in_output", "spaces_between_special_tokens", "truncate_prompt_tokens", "stream_interval",
        "thinking_token_budget", "routed_experts_prompt_start")},
    "best_of": Unhonoured("best_of is not supported; use n", (None, 1)),
    "early_stopping": Unhonoured("early_stopping applies to beam search only, which is not supported", (None, False)),
    "num_beams": Unhonoured("beam search is not supported", (None, 1)),
    "detokenize": Unhonoured("the answer is always text here", (None, True)),
    "logits_processors": Unhonoured("logits processors are Python code, which a request cannot carry"),
    "prompt_logprob_token_ids": Unhonoured("prompt log-probabilities of chosen token ids are not supported yet"),
    "prompt_logprob_start": Unhonoured("prompt log-probabilities cover the whole prompt here"),
    "flat_logprobs": Unhonoured(_VLLM_INTERNAL, (None, False)),
    "output_kind": Unhonoured(_VLLM_INTERNAL),
    "skip_clone": Unhonoured(_VLLM_INTERNAL, (None, False)),
    "output_text_buffer_length": Unhonoured(_VLLM_INTERNAL, (None, 0)),
    "extra_args": Unhonoured(_VLLM_INTERNAL),
    "skip_reading_prefix_cache": Unhonoured(_VLLM_INTERNAL, (None, False)),
    "trace_decode_token_ids": Unhonoured(_VLLM_INTERNAL),
}

UNHONOURED: dict[str, dict[str, Unhonoured]] = {
    "/infer": _SAMPLING_PARAMS,  # the keys of its `params` (also at /vllm-url-infer)
    "/generate": _SAMPLING_PARAMS,
    "/v1/completions": {
        **_SHARED,
        "suffix": Unhonoured("insertion (a suffix after the completion) is not supported"),
        "prompt_embeds": Unhonoured("prompts are text or token ids here, not embeddings"),
        "best_of": Unhonoured("best_of is not supported; use n", (None, 1)),
    },
    "/v1/chat/completions": {
        **_SHARED,
        "functions": Unhonoured(_FUNCTIONS, (None, [])),
        "function_call": Unhonoured(_FUNCTIONS, (None, "none")),
        "chat_template": Unhonoured("a per-request chat template is not accepted (nor by vLLM's server by default); "
                                    "start the server with the model's template"),
        "echo": Unhonoured("echoing the last message is not supported on chat completions", (None, False)),
        "media_io_kwargs": Unhonoured(_MULTIMODAL),
        "mm_processor_kwargs": Unhonoured(_MULTIMODAL),
        "return_prompt_text": Unhonoured(_VLLM_INTERNAL, (None, False)),
        "audio": Unhonoured(_MULTIMODAL),
        "modalities": Unhonoured(_MULTIMODAL, (None, ["text"])),
        "prediction": Unhonoured("predicted outputs are not supported"),
        "web_search_options": Unhonoured("web search is not supported"),
    },
}


def refuse_unhonoured(route: str, extra: dict[str, Any], prefix: str = "") -> None:
    """400 for the first field of `extra` (keys the route's model does not define) that this server does not honour
    and that asks for something; `prefix` names where the keys sit in the body (`params.` on /infer)."""
    unhonoured = UNHONOURED.get(route, {})
    for key, value in extra.items():
        rule = unhonoured.get(key)
        # The type too: `true` is no 1, `0.0` no 0 (and a no-op of None stands for a field left null).
        if rule is not None and not any(type(value) is type(no_op) and value == no_op for no_op in rule.no_op):
            raise RequestError(f"`{prefix}{key}` is not honoured by this server: {rule.why}", prefix + key)

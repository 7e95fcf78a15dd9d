"""vLLM's tokenizer routes: `/tokenize`, `/detokenize` and `/tokenizer_info`, with vLLM's request and answer shapes.

Evaluation harnesses (lm-evaluation-harness' `local-completions`) probe `/tokenizer_info` and `/tokenize` and, when
both answer, count and cut prompts with the server's own tokenizer instead of loading one locally. The routes use the
engine's tokenizer (both engines hold a transformers one) and never the model.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from gunicorn_llm.http.chat_tools import template_tools
from gunicorn_llm.http.common import (
    check_model_name,
    check_token_ids,
    current_engine,
    encode_text,
    parse_body,
    read_json_body,
)
from gunicorn_llm.http.openai_api import chat_prompt_ids
from gunicorn_llm.http.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest

tokenizer_api = Blueprint("tokenizer", __name__)


@tokenizer_api.post("/tokenize")
def tokenize():
    body = read_json_body()
    # vLLM's rule for its two shapes: a body with messages is a conversation.
    chat = isinstance(body, dict) and "messages" in body
    request = parse_body(TokenizeChatRequest if chat else TokenizeCompletionRequest, body, "/tokenize")
    engine = current_engine()
    check_model_name(engine, request.model)
    if chat:
        ids = chat_prompt_ids(engine, request, template_tools(request.tools))
    else:
        ids = encode_text(engine, request.prompt, request.add_special_tokens)
    token_strs = engine.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return jsonify({"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                    "token_strs": token_strs})


@tokenizer_api.post("/detokenize")
def detokenize():
    request = parse_body(DetokenizeRequest, read_json_body(), "/detokenize")
    engine = current_engine()
    check_model_name(engine, request.model)
    check_token_ids(engine, request.tokens, "tokens")
    # As vLLM: special tokens stay in the text.
    return jsonify({"prompt": engine.tokenizer.decode(request.tokens)})


@tokenizer_api.get("/tokenizer_info")
def tokenizer_info():
    """The tokenizer's configuration as vLLM answers it: tokenizer_config.json's keys, without file paths."""
    tokenizer = current_engine().tokenizer
    config = {key: value for key, value in (getattr(tokenizer, "init_kwargs", None) or {}).items()
              if key not in ("vocab_file", "merges_file")}
    info = {**_json_safe(config), "tokenizer_class": type(tokenizer).__name__}
    if tokenizer.chat_template:
        info["chat_template"] = tokenizer.chat_template
    return jsonify(info)


def _json_safe(value: Any) -> Any:
    """Special tokens (AddedToken) as their text, mappings with string keys, anything else unknown as its str."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


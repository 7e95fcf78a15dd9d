"""Function calling and reasoning on /v1/chat/completions, in process: the scripted engine answers fixed texts (a
forced call's JSON, a pythonic call, text with think tags) and the routes read them apart with the server's own code
and vLLM's parsers, whole and streamed; the request-shape 400s; the parser settings' start-up errors. The real
engines, constrained to the calls, are tests/test_tool_calls.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from gunicorn_llm.engines.output_parsers import OutputParserError, load_output_parser
from gunicorn_llm.http.protocol import ChatCompletionChunk, ChatCompletionResponse
from gunicorn_llm.settings import ServerSettings
from scripted_engine import scripted_client

pytestmark = pytest.mark.inprocess

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "smollm2_pythonic_tools.jinja"
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOL_PARSER = {"CHAT_TEMPLATE": str(TEMPLATE), "ENABLE_AUTO_TOOL_CHOICE": "true", "TOOL_CALL_PARSER": "pythonic"}
REASONING_PARSER = {"REASONING_PARSER": "qwen3"}


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


def chat(client, **body) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 40, **body})
    assert response.status_code == 200, response.get_data(as_text=True)
    ChatCompletionResponse.model_validate(response.get_json())  # calls and reasoning are in the documented shape
    return response.get_json()["choices"][0]


def streamed(client, **body) -> list[dict]:
    """The stream's choice objects (the role chunk first), in order."""
    response = client.post("/v1/chat/completions",
                           json={"messages": QUESTION, "max_tokens": 40, "stream": True, **body})
    assert response.status_code == 200, response.get_data(as_text=True)
    events = [line.removeprefix("data: ") for line in response.get_data(as_text=True).split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(event) for event in events[:-1]]  # the documented shape
    return [choice.model_dump(exclude_unset=True) for chunk in chunks for choice in chunk.choices]


def reassembled_calls(choices: list[dict]) -> list[dict]:
    """Streamed tool-call deltas joined as the openai SDK joins them: by index, the arguments' pieces appended."""
    calls: dict[int, dict] = {}
    for choice in choices:
        for delta in choice["delta"].get("tool_calls", []):
            call = calls.setdefault(delta["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or delta.get("id")
            call["name"] += delta.get("function", {}).get("name") or ""
            call["arguments"] += delta.get("function", {}).get("arguments") or ""
    return [calls[index] for index in sorted(calls)]


def whole_calls(choice: dict) -> list[dict]:
    return [{"id": call["id"], **call["function"]} for call in choice["message"]["tool_calls"]]


# -- forced calls: required and a named function (no parser needed) ---------------------------------------------


@pytest.fixture(scope="module")
def required_client(tokenizer):
    return scripted_client(tokenizer, ['[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                                       '{"name": "get_time", "parameters": {}}]'], finish="stop")


def test_required_reads_every_call_with_finish_reason_tool_calls(required_client):
    choice = chat(required_client, tools=[WEATHER, TIME], tool_choice="required")
    assert choice["finish_reason"] == "tool_calls"
    calls = whole_calls(choice)
    assert [(call["name"], json.loads(call["arguments"])) for call in calls] == [("get_weather", {"city": "Paris"}),
                                                                                ("get_time", {})]
    assert all(call["id"].startswith("chatcmpl-tool-") for call in calls) and calls[0]["id"] != calls[1]["id"]
    choices = streamed(required_client, tools=[WEATHER, TIME], tool_choice="required")
    assert [(call["name"], call["arguments"]) for call in reassembled_calls(choices)] == [
        (call["name"], call["arguments"]) for call in calls]
    assert choices[-1]["finish_reason"] == "tool_calls"
    assert not any(choice["delta"].get("content") for choice in choices)


def test_required_takes_tools_whose_schemas_refer_to_their_definitions(required_client):
    # each tool's $defs move to the top of the list's schema, where its references resolve (as vLLM builds it)
    located = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"place": {"$ref": "#/$defs/place"}}, "required": ["place"],
        "$defs": {"place": {"type": "object", "properties": {"city": {"type": "string"}}}}}}}
    assert chat(required_client, tools=[located, TIME], tool_choice="required")["finish_reason"] == "tool_calls"


@pytest.fixture(scope="module")
def named_client(tokenizer):
    return scripted_client(tokenizer, ['{"city": "Paris"}'], finish="stop")


def test_a_named_function_is_called_with_the_answer_as_its_arguments(named_client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    choice = chat(named_client, tools=[WEATHER, TIME], tool_choice=named)
    assert choice["finish_reason"] == "stop"  # OpenAI's and vLLM's for a named function
    assert [(call["name"], call["arguments"]) for call in whole_calls(choice)] == [("get_weather", '{"city": "Paris"}')]
    choices = streamed(named_client, tools=[WEATHER, TIME], tool_choice=named)
    first = next(choice["delta"]["tool_calls"][0] for choice in choices if choice["delta"].get("tool_calls"))
    assert first["type"] == "function" and first["function"]["name"] == "get_weather" and first["id"]
    assert [(call["name"], call["arguments"]) for call in reassembled_calls(choices)] == [
        ("get_weather", '{"city": "Paris"}')]


@pytest.fixture(scope="module")
def cut_clients(tokenizer):
    """Forced answers cut short by max_tokens: a required list and a named function's arguments, unclosed."""
    return {"required": scripted_client(tokenizer, ['[{"name": "get_weather", "parameters": {"city": "Pa'],
                                        finish="length"),
            "named": scripted_client(tokenizer, ['{"city": "Pa'], finish="length")}


def test_a_required_list_cut_short_gives_no_call_and_no_half_json(cut_clients):
    # vLLM's server: the list did not close, so no call is read; the text is not passed off as content either
    choice = chat(cut_clients["required"], tools=[WEATHER, TIME], tool_choice="required")
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "" and choice["message"]["tool_calls"] == []
    choices = streamed(cut_clients["required"], tools=[WEATHER, TIME], tool_choice="required")
    assert reassembled_calls(choices) == [] and choices[-1]["finish_reason"] == "length"
    assert not any(choice["delta"].get("content") for choice in choices)


def test_a_named_call_cut_short_carries_its_arguments_so_far_with_finish_reason_length(cut_clients):
    # vLLM's and OpenAI's: the call with the arguments as far as they came; finish_reason says they were cut
    named = {"type": "function", "function": {"name": "get_weather"}}
    choice = chat(cut_clients["named"], tools=[WEATHER, TIME], tool_choice=named)
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == ""
    assert [(call["name"], call["arguments"]) for call in whole_calls(choice)] == [("get_weather", '{"city": "Pa')]
    choices = streamed(cut_clients["named"], tools=[WEATHER, TIME], tool_choice=named)
    assert [(call["name"], call["arguments"]) for call in reassembled_calls(choices)] == [
        ("get_weather", '{"city": "Pa')]
    assert choices[-1]["finish_reason"] == "length"


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": "auto"}, "tool_choice"),  # no --enable-auto-tool-choice
    ({}, "tool_choice"),  # auto is the default with tools
    ({"tools": []}, "tools"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tool_choice": "any"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strin"}}}}}], "tool_choice": "required"},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(("}}}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools.1.function.parameters"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {"$defs": []}}}],
      "tool_choice": "required"}, "tools.1.function.parameters"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_tool_requests_that_cannot_be_served_are_400s_naming_the_field(named_client, body, param):
    response = named_client.post("/v1/chat/completions", json={"messages": QUESTION, "tools": [WEATHER], **body})
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["param"] == param, error
    if param.endswith("parameters"):  # the engine's own reason, or vLLM's rule on $defs
        assert error["message"].startswith(f"{param}: ") and ("cannot be compiled" in error["message"]
                                                              or "`$defs` must be an object" in error["message"])


# -- the shipped template, vLLM's parsers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parsing_clients(tokenizer):
    """Servers with the shipped template and the pythonic tool-call parser answering a pythonic call and text, and
    one with the qwen3 reasoning parser answering text with its reasoning in think tags."""
    answers = {"call": ('[get_weather(city="Paris"), get_time()]', TOOL_PARSER),
               "reasoned call": ('<think>Weather.</think>[get_weather(city="Paris")]',
                                 {**TOOL_PARSER, **REASONING_PARSER}),
               "text": ("It is sunny in Paris.", TOOL_PARSER),
               "reasoning": ("<think>Paris is in France.</think>It is sunny.", REASONING_PARSER)}
    return {name: scripted_client(AutoTokenizer.from_pretrained(tokenizer.name_or_path), [text], finish="stop",
                                  **settings)
            for name, (text, settings) in answers.items()}


def test_auto_parses_the_models_calls_with_the_tool_call_parser(parsing_clients):
    client = parsing_clients["call"]
    choice = chat(client, tools=[WEATHER, TIME])
    assert choice["finish_reason"] == "tool_calls" and not choice["message"]["content"]
    calls = [(call["name"], json.loads(call["arguments"])) for call in whole_calls(choice)]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    choices = streamed(client, tools=[WEATHER, TIME])
    assert [(call["name"], json.loads(call["arguments"])) for call in reassembled_calls(choices)] == calls
    assert choices[-1]["finish_reason"] == "tool_calls"
    # parallel_tool_calls false: the first call only, as vLLM
    assert len(chat(client, tools=[WEATHER, TIME], parallel_tool_calls=False)["message"]["tool_calls"]) == 1
    assert len(reassembled_calls(streamed(client, tools=[WEATHER, TIME], parallel_tool_calls=False))) == 1


def test_the_reasoning_and_tool_call_parsers_read_one_answer_together(parsing_clients):
    client = parsing_clients["reasoned call"]
    choice = chat(client, tools=[WEATHER])
    assert choice["message"]["reasoning_content"] == "Weather." and choice["finish_reason"] == "tool_calls"
    assert [(call["name"], call["arguments"]) for call in whole_calls(choice)] == [("get_weather", '{"city": "Paris"}')]
    choices = streamed(client, tools=[WEATHER])
    assert "".join(choice["delta"].get("reasoning_content") or "" for choice in choices) == "Weather."
    assert [(call["name"], call["arguments"]) for call in reassembled_calls(choices)] == [
        ("get_weather", '{"city": "Paris"}')]


def test_auto_and_none_answer_text_as_content(parsing_clients):
    for tool_choice in ("auto", "none"):
        choice = chat(parsing_clients["text"], tools=[WEATHER], tool_choice=tool_choice)
        assert choice["message"]["content"] == "It is sunny in Paris." and "tool_calls" not in choice["message"]
        assert choice["finish_reason"] == "stop"
    # tool_choice none reads no call even when the answer is one
    assert chat(parsing_clients["call"], tools=[WEATHER], tool_choice="none")["message"]["content"].startswith("[")


def test_the_reasoning_parser_splits_reasoning_from_content(parsing_clients):
    client = parsing_clients["reasoning"]
    message = chat(client)["message"]
    assert (message["reasoning_content"], message["content"]) == ("Paris is in France.", "It is sunny.")
    assert message["reasoning"] == message["reasoning_content"]  # vLLM's newer name
    choices = streamed(client)
    assert "".join(choice["delta"].get("reasoning_content") or "" for choice in choices) == "Paris is in France."
    assert "".join(choice["delta"].get("content") or "" for choice in choices) == "It is sunny."
    hidden = chat(client, include_reasoning=False)["message"]
    assert "reasoning_content" not in hidden and hidden["content"] == "It is sunny."
    # the template's switch reaches the parser, as in vLLM: no thinking, no reasoning read
    unread = chat(client, chat_template_kwargs={"enable_thinking": False})["message"]
    assert "reasoning_content" not in unread and unread["content"] == "<think>Paris is in France.</think>It is sunny."


def test_tokenize_renders_the_tools_as_chat_completions_do(parsing_clients, tokenizer):
    # vLLM's /tokenize takes tools with a conversation and hands them to the template
    client = parsing_clients["text"]
    with_tools = client.post("/tokenize", json={"messages": QUESTION, "tools": [WEATHER]})
    assert with_tools.status_code == 200, with_tools.get_data(as_text=True)
    tokens = with_tools.get_json()["tokens"]
    without = client.post("/tokenize", json={"messages": QUESTION}).get_json()["tokens"]
    assert "get_weather" in tokenizer.decode(tokens) and "get_weather" not in tokenizer.decode(without)
    answer = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2, "tools": [WEATHER],
                                                       "tool_choice": "none"})
    assert answer.get_json()["usage"]["prompt_tokens"] == len(tokens)


def test_a_tool_result_turn_renders_through_the_template(parsing_clients, tokenizer):
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21 C"}]
    answer = parsing_clients["text"].post("/v1/chat/completions",
                                          json={"messages": history, "tools": [WEATHER], "max_tokens": 5})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = TEMPLATE.read_text()
    history[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}  # templates take them as objects
    rendered = tokenizer.apply_chat_template(history, tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    assert '[get_weather(city="Paris")]<|im_end|>\n<|im_start|>tool\nsunny, 21 C<|im_end|>' in rendered
    assert answer.get_json()["usage"]["prompt_tokens"] == len(tokenizer(rendered)["input_ids"])


# -- the settings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "named"), [
    ({"ENABLE_AUTO_TOOL_CHOICE": "true"}, "--enable-auto-tool-choice requires --tool-call-parser"),
    ({"ENABLE_AUTO_TOOL_CHOICE": "true", "TOOL_CALL_PARSER": "nonesuch"}, "--tool-call-parser nonesuch"),
    ({"REASONING_PARSER": "nonesuch"}, "--reasoning-parser nonesuch"),
    ({"REASONING_PARSER": "deepseek_r1"}, "--reasoning-parser deepseek_r1 cannot be used with the tokenizer"),
    ({"CHAT_TEMPLATE": "no-such-template.jinja"}, "--chat-template no-such-template.jinja"),
])
def test_parser_settings_that_cannot_work_stop_the_start_with_one_line(tokenizer, settings, named):
    with pytest.raises(OutputParserError, match=named) as caught:
        load_output_parser(ServerSettings(**settings), tokenizer)
    assert "\n" not in str(caught.value)

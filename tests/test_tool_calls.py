"""Function calling and reasoning end to end on BOTH engines, with the official openai SDK.

One real server per engine (1 CPU worker, the embedded model) started as vLLM's server was for the comparison in the
issue: the shipped tool template, `--enable-auto-tool-choice --tool-call-parser pythonic`, and `--reasoning-parser
qwen3`. `required` and named choices must give a valid call even from this tiny model (structured decoding);
`auto` must find a pythonic call in the answer (one the model is held to by a regex, so that the parser, not the
model's skill, is what is tested), with the reasoning before it split off; the documented example runs as shown.
The request shapes and the parsers' corner cases are tests/test_tool_calls_inprocess.py's.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest

from conftest import openai_client

MODEL = "SmolLM2-135M-Instruct"
HTTP_TIMEOUT = 300  # a shared 2-core machine under load: 1 s a token was seen
ROOT = Path(__file__).resolve().parent.parent
EXTRA_SERVER_ARGS = ("--chat-template", str(ROOT / "templates" / "smollm2_pythonic_tools.jinja"),
                     "--enable-auto-tool-choice", "--tool-call-parser", "pythonic", "--reasoning-parser", "qwen3")
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": CITY}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}  # the qwen3 parser then reads no reasoning

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("server_alive")]


@pytest.fixture(scope="module")
def server(engine_server):
    return engine_server


@pytest.fixture
def client(server):
    return openai_client(server, HTTP_TIMEOUT)


def calls_of(message) -> list[tuple[str, dict]]:
    """(name, arguments) of each call, every one checked against its tool's schema."""
    calls = [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls or []]
    for name, arguments in calls:
        jsonschema.validate(arguments, SCHEMAS[name])
    return calls


def whole_and_streamed(client, max_tokens=40, **request):
    """The whole answer's choice and the streamed one's, as the SDK reassembles its deltas."""
    whole = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=max_tokens, **request).choices[0]
    with client.chat.completions.stream(model=MODEL, temperature=0, max_tokens=max_tokens, **request) as stream:
        streamed = stream.get_final_completion().choices[0]
    return whole, streamed


def test_required_gives_a_valid_call_whole_and_streamed(client):
    # one call (parallel_tool_calls false): the model would otherwise repeat calls up to max_tokens, and several
    # calls are the in-process tests' (the list's schema is the same)
    whole, streamed = whole_and_streamed(client, messages=QUESTION, tools=[WEATHER, TIME], tool_choice="required",
                                         parallel_tool_calls=False)
    assert whole.finish_reason == streamed.finish_reason == "tool_calls"
    calls = calls_of(whole.message)
    assert len(calls) == 1 and calls_of(streamed.message) == calls
    assert all(call.id.startswith("chatcmpl-tool-") for call in whole.message.tool_calls)


def test_a_named_function_gives_its_call_whole_and_streamed(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    whole, streamed = whole_and_streamed(client, messages=QUESTION, tools=[WEATHER, TIME], tool_choice=named)
    assert whole.finish_reason == streamed.finish_reason == "stop"  # OpenAI's and vLLM's for a named function
    assert [name for name, _ in calls_of(whole.message)] == ["get_time"]
    assert calls_of(streamed.message) == calls_of(whole.message)


def test_a_tool_result_turn_renders_and_is_answered(client):
    called = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=40, messages=QUESTION,
                                            tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    call = called.choices[0].message
    history = [*QUESTION, call.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "sunny, 21 C"}]
    answer = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=12, messages=history,
                                            tools=[WEATHER], tool_choice="none", extra_body=NO_THINKING)
    choice = answer.choices[0]
    assert choice.message.content and not choice.message.tool_calls and choice.finish_reason in ("stop", "length")
    # the history was rendered: the prompt holds the call and its result too
    assert answer.usage.prompt_tokens > called.usage.prompt_tokens + 10


def test_none_answers_text(client):
    request = {"model": MODEL, "temperature": 0, "max_tokens": 12, "messages": QUESTION, "tools": [WEATHER],
               "tool_choice": "none", "extra_body": NO_THINKING}
    whole = client.chat.completions.create(**request).choices[0]
    assert whole.message.content and not whole.message.tool_calls
    # a plain stream: the SDK's stream helper refuses to assemble an answer cut by max_tokens when tools are sent
    chunks = [chunk.choices[0] for chunk in client.chat.completions.create(stream=True, **request) if chunk.choices]
    assert "".join(chunk.delta.content or "" for chunk in chunks) == whole.message.content
    assert not any(chunk.delta.tool_calls for chunk in chunks)


def test_auto_reads_the_reasoning_and_the_pythonic_call_of_an_answer(client):
    # held to a think block and a pythonic call, which the qwen3 and pythonic parsers must read apart
    regex = r'<think>[A-Za-z ]{1,30}</think>\[get_weather\(city="[A-Z][a-z]{2,12}"\)\]'
    whole, streamed = whole_and_streamed(client, messages=QUESTION, tools=[WEATHER, TIME],
                                         extra_body={"structured_outputs": {"regex": regex}})
    assert whole.finish_reason == streamed.finish_reason == "tool_calls"
    calls = calls_of(whole.message)
    assert [name for name, _ in calls] == ["get_weather"] and calls_of(streamed.message) == calls
    reasoning = whole.message.model_extra["reasoning_content"]
    assert re.fullmatch("[A-Za-z ]{1,30}", reasoning) and not whole.message.content
    assert streamed.message.model_extra["reasoning_content"] == reasoning


def test_auto_answers_text_or_a_parsed_call(client):
    choice = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=12, messages=QUESTION,
                                            tools=[WEATHER], extra_body=NO_THINKING).choices[0]
    assert (choice.finish_reason == "tool_calls" and calls_of(choice.message)) or \
        (choice.message.content and not choice.message.tool_calls)


def test_a_tool_schema_the_engine_cannot_compile_is_a_400_naming_it(client):
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(("}}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER, bad], tool_choice="required")
    assert caught.value.body["param"] == "tools.1.function.parameters", caught.value.body


def test_the_documented_examples_print_what_the_docs_show(server):
    """docs/api.md's function-calling and reasoning examples, run in turn against this server (the second uses the
    first's client): the output must be the lines shown in them."""
    sections = (ROOT / "docs" / "api.md").read_text(encoding="utf-8").split("## Function calling", 1)[1]
    sections = sections.split("\n## A client that leaves", 1)[0]
    code = "".join(re.findall(r"```python\n(.*?)```", sections, re.DOTALL))
    shown = [line.removeprefix("# ") for line in code.splitlines() if line.startswith("# ")]
    assert len(shown) == 3
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code.replace("http://127.0.0.1:5002", server.url), {})  # noqa: S102 - the docs' own example
    assert printed.getvalue().splitlines() == shown

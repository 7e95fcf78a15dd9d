"""vLLM's tool-call and reasoning parsers, chosen by `--tool-call-parser` (with `--enable-auto-tool-choice`) and
`--reasoning-parser`, and the `--chat-template` file: what reads a chat answer's text apart, for both engines.

vLLM's parsers need only the model's tokenizer, so the transformers engine uses them too when vLLM is installed.
They are composed as vLLM's server composes them (`ParserManager.get_parser`, one `Parser` class reading reasoning,
content and tool calls) and checked against the tokenizer at start, so a parser that cannot work with the model's
tokenizer (special tokens it lacks) stops the server with one line instead of failing requests.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gunicorn_llm.engines.model_store import EMBEDDED_MODEL_NAME
from gunicorn_llm.settings import ServerSettings


class OutputParserError(ValueError):
    """The parser settings cannot work: one line naming the option."""


def check_parser_settings(settings: ServerSettings) -> None:
    """What can be told without the model: the option pairs, vLLM's presence, the template file's."""
    if settings.enable_auto_tool_choice and not settings.tool_call_parser:
        raise OutputParserError("--enable-auto-tool-choice requires --tool-call-parser (as in vLLM)")
    if (settings.tool_call_parser or settings.reasoning_parser) and importlib.util.find_spec("vllm") is None:
        option = "--tool-call-parser" if settings.tool_call_parser else "--reasoning-parser"
        raise OutputParserError(f"{option}: the parsers are vLLM's and vLLM is not installed (pip install -r "
                                "requirements-vllm-cpu.txt, or requirements-vllm-gpu.txt on GPU machines)")
    if settings.chat_template:
        read_chat_template(settings.chat_template)


def read_chat_template(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise OutputParserError(f"--chat-template {path}: {getattr(error, 'strerror', None) or error}") from None


def load_output_parser(settings: ServerSettings, tokenizer) -> type | None:
    """vLLM's `Parser` class for the settings, checked against `tokenizer`; None when no parser is set (or only a
    tool-call parser without --enable-auto-tool-choice, which vLLM's server does not use either)."""
    check_parser_settings(settings)
    tool_parser = settings.tool_call_parser if settings.enable_auto_tool_choice else None
    if not tool_parser and not settings.reasoning_parser:
        return None
    from vllm.parser.parser_manager import ParserManager
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    for option, name, known in (("--tool-call-parser", tool_parser, ToolParserManager.list_registered()),
                                ("--reasoning-parser", settings.reasoning_parser,
                                 ReasoningParserManager.list_registered())):
        if name and name not in known:
            raise OutputParserError(f"{option} {name}: vLLM has no such parser; it has {', '.join(known)}")
    try:
        return ParserManager.get_parser(tool_parser_name=tool_parser, reasoning_parser_name=settings.reasoning_parser,
                                        enable_auto_tools=settings.enable_auto_tool_choice, tokenizer=tokenizer,
                                        model_name=settings.model_name or EMBEDDED_MODEL_NAME)
    except (TypeError, ValueError, ImportError, RuntimeError) as error:  # vLLM's own message names the option
        raise OutputParserError(str(error).splitlines()[0]) from None

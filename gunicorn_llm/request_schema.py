"""The `/infer` request contract, validated with pydantic, once for both engines.

Body: `{"instances": [str, ...], "params": {...}}`. `params` are vLLM-style sampling parameters with the original
evaluation toolkit's defaults (vLLM's `SamplingParams` defaults: temperature 1.0, max_tokens 16, ...). Keys this
server does not know are dropped and reported so the caller can log them: existing clients send extra keys. The
names UltraEval's transformers server also took (`max_new_tokens`, `do_sample`) mean what they meant there.
Wrong types and out-of-range values raise `RequestError` naming the field.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)


def _list_to_tuple(value: Any) -> Any:
    """A JSON list as a tuple, so that the frozen models hash (equal requests batch together)."""
    return tuple(value) if isinstance(value, list) else value


class RequestError(ValueError):
    """The request cannot be served as sent; `param` names the offending field (dotted path) when there is one."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 error_type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.error_type = error_type
        self.headers = headers or {}


GREEDY_BELOW = 1e-5  # vLLM's sampling epsilon
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a bias, either way
_TOKEN_ID_KEY = re.compile(r"[0-9]+")
# `logit_bias` on the wire: token ids (as JSON object keys, so strings) to biases. Kept as sorted (id, bias) pairs so
# that the params hash; the document shows the wire form.
LOGIT_BIAS_JSON = {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                   "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS, "maximum": MAX_LOGIT_BIAS},
                   "description": "token id (a string) -> bias added to its logit before sampling, -100 to 100"}
LogitBias = Annotated[tuple[tuple[int, float], ...] | None,
                      WithJsonSchema({"anyOf": [LOGIT_BIAS_JSON, {"type": "null"}], "default": None})]

# The sampling fields' bounds, said once: SamplingParams' fields and the OpenAI requests' (http/protocol/), which are
# validated into SamplingParams, take them from here, so the OpenAPI document states them on both.
ChoiceCount = Annotated[int, Field(ge=1, le=64)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]  # presence and frequency
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=10.0)]
Temperature = Annotated[float, Field(ge=0.0, le=100.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=-1)]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]
MaxTokens = Annotated[int, Field(ge=1)]
MinTokens = Annotated[int, Field(ge=0)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]
# `stop` on the wire: one string or a list of them, none empty (SamplingParams' validators below check it, with their
# own message; the OpenAI requests pass theirs to it). Kept as a tuple, so that the params hash.
_STOP_STRING_JSON = {"type": "string", "minLength": 1}
STOP_JSON = {"anyOf": [_STOP_STRING_JSON, {"type": "array", "items": _STOP_STRING_JSON}, {"type": "null"}]}
STOP_DESCRIPTION = "strings that end generation; not part of the answer (one string or a list; an empty string is " \
                   "refused)"


class StructuredOutputs(BaseModel):
    """What the answer must look like: exactly one of a JSON schema, any JSON object, a regular expression, one of
    some strings, or a grammar (vLLM's `structured_outputs`, with its field names; `response_format` becomes one
    too). Frozen and hashable like the params that carry it: the schema is kept as canonical JSON text, which is
    also what compiled grammars are cached by. vLLM's per-request options that its engine ignores (whitespace,
    additional properties: server settings there) and structural tags are refused, not dropped."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    # `json` would shadow BaseModel.json: the field is named for what it holds and takes vLLM's name as its alias
    # a schema object is kept as its canonical JSON text (what the validator below returns)
    json_schema: str | dict[str, Any] | None = Field(None, alias="json", description="a JSON schema (an object or "
                                                                                     "its JSON text)")
    json_object: bool | None = Field(None, description="true: any JSON object")
    regex: str | None = Field(None, description="a regular expression the whole answer matches")
    choice: tuple[str, ...] | None = Field(None, min_length=1, description="the answer is one of these strings")
    grammar: str | None = Field(None, min_length=1, description="an EBNF (GBNF) or Lark grammar")
    disable_any_whitespace: bool = Field(False, description="refused when true: a server setting in vLLM")
    disable_additional_properties: bool = Field(False, description="refused when true: a server setting in vLLM")
    whitespace_pattern: str | None = Field(None, description="refused: a server setting in vLLM")
    structural_tag: str | None = Field(None, description="refused: structural tags are not supported")

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_as_canonical_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"the schema is not valid JSON: {error}") from None
        if isinstance(value, dict):
            return json.dumps(value, sort_keys=True, ensure_ascii=False)
        return value

    _choices_as_tuple = field_validator("choice", mode="before")(_list_to_tuple)

    @field_validator("json_object")
    @classmethod
    def _json_object_is_true(cls, value: bool | None) -> bool | None:
        if value is False:
            raise ValueError("json_object must be true if set; leave structured_outputs out for no constraint")
        return value

    @field_validator("disable_any_whitespace", "disable_additional_properties")
    @classmethod
    def _server_settings_in_vllm(cls, value: bool) -> bool:
        if value:
            raise ValueError("not supported per request (vLLM's engine takes it as a server setting only)")
        return value

    @field_validator("whitespace_pattern")
    @classmethod
    def _no_whitespace_pattern(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError("not supported per request (vLLM's engine ignores it there too)")

    @field_validator("structural_tag")
    @classmethod
    def _no_structural_tags(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError("structural tags are not supported by this server")

    @property
    def kind(self) -> str:
        """Which constraint it is, by its field's name in vLLM's request: json, json_object, regex, choice, grammar."""
        return self._given()[0]

    def _given(self) -> list[str]:
        return [name for name in ("json", "json_object", "regex", "choice", "grammar")
                if getattr(self, "json_schema" if name == "json" else name) is not None]

    @model_validator(mode="after")
    def _exactly_one_constraint(self):
        given = self._given()
        if len(given) != 1:
            raise ValueError("exactly one of json, json_object, regex, choice or grammar is required, "
                             f"not {len(given)}" + (f" ({', '.join(given)})" if given else ""))
        return self


def _as_on_the_wire(schema: dict[str, Any]) -> None:
    schema.pop("additionalProperties", None)
    schema["description"] += (" Keys the server does not know are ignored (with a warning); vLLM's that it does not "
                              "honour are refused where they ask for something.")


class SamplingParams(BaseModel):
    """How to generate, for every instance of a request. Immutable and hashable, so equal params batch together."""

    # On the wire (/infer's params) keys the server does not know are dropped with a warning before validation
    # (parse_infer_request), so the document allows them; the model itself forbids them.
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False,
                              json_schema_extra=_as_on_the_wire)

    n: ChoiceCount = Field(1, description="completions per instance")
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    temperature: Temperature = Field(1.0, description="0 (or below 1e-5, as in vLLM) is greedy")
    top_p: TopP = 1.0
    top_k: TopK = Field(-1, description="-1 or 0: no top-k cut")
    min_p: MinP = 0.0
    seed: Seed | None = None
    stop: Annotated[tuple[str, ...] | None, WithJsonSchema(STOP_JSON)] = Field(None, description=STOP_DESCRIPTION)
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    max_tokens: MaxTokens = 16
    logprobs: TopLogprobs | None = Field(None, description="accepted for compatibility; /infer answers text")
    prompt_logprobs: TopLogprobs | None = Field(
        None, description="set: answer per-token prompt log-probabilities instead of generating"
    )
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = Field(
        None, description="constrain the answer to a JSON schema, any JSON object, a regex, a choice or a grammar"
    )
    # vLLM's token controls (OpenAI's logit_bias), applied in vLLM's order: allowed ids, bad words, min_tokens, bias
    logit_bias: LogitBias = None
    allowed_token_ids: tuple[Annotated[int, Field(ge=0)], ...] | None = Field(
        None, min_length=1, description="only these token ids may be generated")
    bad_words: tuple[Annotated[str, Field(min_length=1)], ...] | None = Field(
        None, description="words that may not be generated (vLLM's rule: a word's last token is banned where the "
                          "answer so far ends with the tokens before it; with and without a leading space)")
    min_tokens: MinTokens = Field(0, description="tokens generated before an end-of-sequence or stop token, or a "
                                                 "stop string, may end the answer")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string_is_a_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(value) or None  # no stop strings is the same request as none given
        return value

    _stop_token_ids_as_tuple = field_validator("stop_token_ids", mode="before")(_list_to_tuple)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and any(text == "" for text in value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_as_sorted_pairs(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        pairs = []
        for key, bias in value.items():
            if isinstance(key, str) and _TOKEN_ID_KEY.fullmatch(key):
                key = int(key)
            if type(key) is not int or key < 0:
                raise ValueError(f"keys are token ids (non-negative integers, as strings), not {key!r}")
            if type(bias) not in (int, float) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"the bias of token {key} must be a number from -100 to 100, not {bias!r}")
            pairs.append((key, float(bias)))
        return tuple(sorted(pairs)) or None  # no biases is the same request as none given

    _allowed_ids_as_tuple = field_validator("allowed_token_ids", mode="before")(_list_to_tuple)

    @field_validator("bad_words", mode="before")
    @classmethod
    def _bad_words_as_tuple(cls, value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(word, str) for word in value):
            return tuple(dict.fromkeys(value)) or None  # as vLLM: repeats dropped, none given is no list
        return _list_to_tuple(value)  # anything else is refused by the field's type

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens_within_max_tokens(cls, value: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")  # validated before (declared first); absent if it was invalid
        if max_tokens is not None and value > max_tokens:
            raise ValueError(f"min_tokens ({value}) must not exceed max_tokens ({max_tokens})")
        return value

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, value: float) -> float:
        # Dividing logits by a temperature this small overflows them; vLLM treats it as greedy too.
        return 0.0 if value < GREEDY_BELOW else value

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def controls_tokens(self) -> bool:
        """Whether the request biases or restricts which tokens may come (logit_bias, allowed_token_ids, bad_words,
        min_tokens): only sampling that applies these per row serves it."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words or self.min_tokens)

    @property
    def scores_prompt(self) -> bool:
        return self.prompt_logprobs is not None


class InferRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    instances: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    params: SamplingParams = Field(default_factory=SamplingParams,
                                   description="the sampling parameters; absent or null: the defaults")
    stream: bool = Field(False, description="answer one JSON line per text delta instead of one list")

    @field_validator("params", mode="before", json_schema_input_type=SamplingParams | None)
    @classmethod
    def _null_is_the_defaults(cls, value: Any) -> Any:
        return SamplingParams() if value is None else value  # some clients send "params": null for the defaults


KNOWN_PARAMS = frozenset(SamplingParams.model_fields)


def parse_infer_request(body: Any) -> tuple[InferRequest, dict[str, Any]]:
    """Validate an `/infer` body; return it with the params keys it does not know (the caller refuses those that
    ask for something this server does not do, and ignores the rest)."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object with 'instances' and 'params'")
    unknown: dict[str, Any] = {}
    if isinstance(body.get("params"), dict):
        params = _generate_names_as_vllms(body["params"])
        unknown = {key: value for key, value in params.items() if key not in KNOWN_PARAMS}
        body = {**body, "params": {key: value for key, value in params.items() if key in KNOWN_PARAMS}}
    try:
        return InferRequest.model_validate(body), unknown
    except ValidationError as error:
        raise as_request_error(error) from None


def _generate_names_as_vllms(params: dict[str, Any]) -> dict[str, Any]:
    """The params with transformers' `generate()` names that UltraEval's transformers server took beside vLLM's
    (`max_new_tokens`, `do_sample`) as the vLLM params they mean: ignored, they would change the answers silently."""
    params = dict(params)
    if "max_new_tokens" in params:
        max_new_tokens = params.pop("max_new_tokens")
        if "max_tokens" in params and params["max_tokens"] != max_new_tokens:
            raise RequestError(f"params.max_new_tokens: {max_new_tokens!r} differs from max_tokens "
                               f"{params['max_tokens']!r}; send one of them", "params.max_new_tokens")
        params["max_tokens"] = max_new_tokens
    if "do_sample" in params:
        do_sample = params.pop("do_sample")
        if type(do_sample) is not bool:
            raise RequestError("params.do_sample: true or false", "params.do_sample")
        if not do_sample:
            params["temperature"] = 0  # greedy, whatever the temperature, as generate() decodes
        elif type(temperature := params.get("temperature")) in (int, float) and temperature < GREEDY_BELOW:
            raise RequestError(f"params.do_sample: true samples, and temperature {temperature} is greedy decoding; "
                               f"send a temperature of at least {GREEDY_BELOW} to sample", "params.do_sample")
    return params


def as_request_error(error: ValidationError) -> RequestError:
    """The first problem of a pydantic error as one message naming the field, e.g. `params.top_p: ...`."""
    problem = error.errors()[0]
    param = ".".join(str(part) for part in problem["loc"]) or None
    message = problem["msg"]
    if problem["type"] == "missing":
        message = "field required"
    message = message.removeprefix("Value error, ")  # a validator's own message says it all
    return RequestError(f"{param}: {message}" if param else message, param)

"""The `/infer` request contract, validated with pydantic, once for both engines.

Body: `{"instances": [str, ...], "params": {...}}`. `params` are vLLM-style sampling parameters with the original
evaluation toolkit's defaults (vLLM's `SamplingParams` defaults: temperature 1.0, max_tokens 16, ...). Keys this
server does not know are dropped and reported so the caller can log them: existing clients send extra keys.
Wrong types and out-of-range values raise `RequestError` naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


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


class SamplingParams(BaseModel):
    """How to generate, for every instance of a request. Immutable and hashable, so equal params batch together."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False)

    n: int = Field(1, ge=1, le=64, description="completions per instance")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 (or below 1e-5, as in vLLM) is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0: no top-k cut")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: tuple[str, ...] | None = Field(None, description="strings that end generation; not part of the answer")
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20, description="accepted for compatibility; /infer answers text")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20, description="set: answer per-token prompt log-probabilities instead of generating"
    )
    skip_special_tokens: bool = True

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string_is_a_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(value) or None  # no stop strings is the same request as none given
        return value

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and any(text == "" for text in value):
            raise ValueError("stop strings must not be empty")
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
    def scores_prompt(self) -> bool:
        return self.prompt_logprobs is not None


class InferRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    instances: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    params: SamplingParams = Field(default_factory=SamplingParams)
    stream: bool = Field(False, description="answer one JSON line per text delta instead of one list")


KNOWN_PARAMS = frozenset(SamplingParams.model_fields)


def parse_infer_request(body: Any) -> tuple[InferRequest, list[str]]:
    """Validate an `/infer` body; return it with the names of the params keys that were ignored."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object with 'instances' and 'params'")
    if body.get("params", ...) is None:  # some clients send "params": null for "the defaults"
        body = {key: value for key, value in body.items() if key != "params"}
    ignored: list[str] = []
    if isinstance(body.get("params"), dict):
        params = body["params"]
        ignored = sorted(key for key in params if key not in KNOWN_PARAMS)
        body = {**body, "params": {key: value for key, value in params.items() if key in KNOWN_PARAMS}}
    try:
        return InferRequest.model_validate(body), ignored
    except ValidationError as error:
        raise as_request_error(error) from None


def as_request_error(error: ValidationError) -> RequestError:
    """The first problem of a pydantic error as one message naming the field, e.g. `params.top_p: ...`."""
    problem = error.errors()[0]
    param = ".".join(str(part) for part in problem["loc"]) or None
    message = problem["msg"]
    if problem["type"] == "missing":
        message = "field required"
    message = message.removeprefix("Value error, ")  # a validator's own message says it all
    return RequestError(f"{param}: {message}" if param else message, param)

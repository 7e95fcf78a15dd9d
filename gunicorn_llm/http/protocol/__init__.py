"""The wire protocol in one place: the models of what each route takes and answers, and the route table.

- `requests.py`: the request models the routes validate their JSON bodies through (`/generate`, the OpenAI routes,
  the tokenizer routes), with their checks and their bounds.
- `responses.py`: the response models, whole and streamed, and the one error shape.
- `routes.py`: the route table, `ROUTES`: each route's method, path, request and response models and errors.

The OpenAPI document (http/openapi_spec.py, `GET /openapi.json`) is generated from the table and the models, the fuzz
test (tests/test_fuzz.py) walks the same table, and tests/test_protocol.py checks that the app serves exactly these
routes and that real answers validate against the response models.

`/infer`'s request model and `SamplingParams` and `StructuredOutputs`, which every route validates into, live in
gunicorn_llm/request_schema.py, below the engines: the engines take them, and an engine may not import the HTTP layer
(tests/test_layout.py), so moving them here would make the engines depend on the layer above them. They are
re-exported here, so the whole protocol is importable from this package.
"""

from gunicorn_llm.http.protocol.requests import (
    STREAMING_QUERY_VALUES,
    ChatCompletionRequest,
    ChatMessage,
    ChatTemplateControls,
    CompletionRequest,
    DetokenizeRequest,
    FunctionCallMessage,
    FunctionDefinition,
    FunctionName,
    GenerateRequest,
    JsonSchemaFormat,
    NamedToolChoice,
    ResponseFormat,
    SamplingFields,
    StreamOptions,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeRequest,
    Tool,
    ToolCallMessage,
    ToolFields,
)
from gunicorn_llm.http.protocol.responses import (
    AssistantMessage,
    CalledFunction,
    CalledFunctionDelta,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    DetokenizeResponse,
    ErrorDetail,
    ErrorResponse,
    Health,
    InferResponse,
    InferStreamLine,
    ModelCard,
    ModelList,
    OpenAPIDocument,
    PromptTokenLogprob,
    Ready,
    TokenizeResponse,
    TokenizerInfo,
    ToolCall,
    ToolCallDelta,
    Usage,
    Workers,
    WorkerState,
)
from gunicorn_llm.http.protocol.routes import (
    EVENT_STREAM,
    GENERATION_ERRORS,
    JSON_LINES,
    ROUTES,
    TOKENIZER_ERRORS,
    Route,
)
from gunicorn_llm.request_schema import InferRequest, SamplingParams, StructuredOutputs

__all__ = [  # the names of the protocol, from whichever module holds them
    "AssistantMessage", "CalledFunction", "CalledFunctionDelta", "ChatChoice", "ChatChunkChoice",
    "ChatCompletionChunk", "ChatCompletionRequest", "ChatCompletionResponse", "ChatDelta", "ChatLogprobs",
    "ChatMessage", "ChatTemplateControls", "ChatTokenLogprob", "ChatTopLogprob", "CompletionChoice",
    "CompletionChunk", "CompletionLogprobs", "CompletionRequest", "CompletionResponse", "DetokenizeRequest",
    "DetokenizeResponse", "EVENT_STREAM", "ErrorDetail", "ErrorResponse", "FunctionCallMessage",
    "FunctionDefinition", "FunctionName", "GENERATION_ERRORS", "GenerateRequest", "Health", "InferRequest",
    "InferResponse", "InferStreamLine", "JSON_LINES", "JsonSchemaFormat", "ModelCard", "ModelList",
    "NamedToolChoice", "OpenAPIDocument", "PromptTokenLogprob", "Ready", "ResponseFormat", "ROUTES", "Route",
    "STREAMING_QUERY_VALUES", "SamplingFields", "SamplingParams", "StreamOptions", "StructuredOutputs",
    "TOKENIZER_ERRORS", "TokenizeChatRequest", "TokenizeCompletionRequest", "TokenizeRequest", "TokenizeResponse",
    "TokenizerInfo", "Tool", "ToolCall", "ToolCallDelta", "ToolCallMessage", "ToolFields", "Usage", "WorkerState",
    "Workers",
]

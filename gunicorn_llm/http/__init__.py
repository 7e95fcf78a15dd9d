"""The HTTP layer: the Flask app a gunicorn worker serves, over one engine.

`app` builds the app (health, readiness, metrics, workers, the monitor page) and loads the engine; `native_api`
serves UltraEval's `/infer` (and `/vllm-url-infer`) and `/generate`, `openai_api` the OpenAI routes,
`tokenizer_api` `/tokenize`, `/detokenize` and `/tokenizer_info`; `guards` checks API keys and limits, `common`
holds what the routes share (errors, streaming); `protocol` is the wire protocol in one place (the route table, the
models of what the routes take and answer), which `openapi_spec` renders as the OpenAPI document.

May import everything below it: the engines, ops, settings and request_schema.
"""

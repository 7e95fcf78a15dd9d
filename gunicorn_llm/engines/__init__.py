"""The engines: a model loaded in a worker, behind one interface (`base.Engine`).

`base` defines the interface and the streams requests read; `generation` turns token ids into text (stop strings,
incremental decoding, choices); `model_store` finds or converts the model. The vLLM engine is `vllm_engine` (with
`cpu_memory`, which sizes its cache on CPU); the transformers engine is `transformers_engine` with its batching
paths behind one interface (`transformers_batching`: `transformers_slots`, `transformers_continuous`,
`transformers_generate`) and per-row work (`transformers_sampling`, `transformers_scoring`).

May import `gunicorn_llm.ops`, `gunicorn_llm.settings` and `gunicorn_llm.request_schema`; never the HTTP layer.
"""

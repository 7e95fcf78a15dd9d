"""Operations: what running the server takes, apart from serving a model.

The GPU dispatcher and the process groups that leave no engine process behind (`dispatcher`,
`engine_processes`), the gunicorn worker that drains (`draining_worker`), Prometheus metrics and access lines
(`metrics`), systemd's readiness protocol (`systemd_notify`) and the monitor page (`monitor`).

May import `gunicorn_llm.settings` and `gunicorn_llm.request_schema`; never the engines or the HTTP layer.
"""

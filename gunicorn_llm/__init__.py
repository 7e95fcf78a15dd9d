"""gunicorn-llm: a gunicorn pre-fork server that serves a language model on every GPU of a machine.

The layers, each importing only those below it:

- `settings` (every option, from the environment) and `request_schema` (what a request may say): the base;
- `ops/`: processes and GPUs, metrics, systemd, the monitor page: what running the server takes;
- `engines/`: the vLLM and transformers engines behind one interface, and the text they produce;
- `http/`, `preflight` and `launcher_options`: the Flask routes over an engine, the launcher's checks, and its
  options, --help and the docs' option tables rendered from the settings.

The repository root keeps the entry points users know: start_gunicorn.sh, gunicorn_conf.py, vllm_url_m.py and
transformers_url_m.py (the WSGI apps), dispatcher.py and bench.py. tests/test_layout.py checks the layering.
"""

"""The vLLM engine for `--infer_type vllm`: not built yet.

The vLLM engine (continuous batching over a tensor-parallel slice, through the same serving.py contract) is the
subject of its own piece of work. Until it lands, the launcher's pre-flight refuses `--infer_type vllm` with the
reason below, and asking this module for its WSGI `app` (as gunicorn does) raises the same message.
"""

from __future__ import annotations


def unavailable_reason() -> str | None:
    """Why this backend cannot serve yet (None once it can)."""
    return "the vLLM engine is not part of this version yet; use --infer_type transformers"


def __getattr__(name: str):
    if name == "app":
        raise RuntimeError(unavailable_reason())
    raise AttributeError(name)

"""The launcher's pre-flight (`python -m gunicorn_llm.preflight`, run by start_gunicorn.sh before gunicorn): the
settings, the engine's presence, API keys, a free GPU slice, the model's folder, the chat template file, the output
parsers (vLLM's, fitting the model's tokenizer) and, for vLLM on CPU, room for its cache, each refused with one line
that names the problem. It stands beside the HTTP layer: it may import the settings, ops and engines.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

from gunicorn_llm.engines.cpu_memory import CpuMemoryError, cpu_kv_cache_bytes
from gunicorn_llm.engines.model_store import ModelNotFoundError, resolve_model
from gunicorn_llm.engines.output_parsers import OutputParserError, check_parser_settings, load_output_parser
from gunicorn_llm.ops.dispatcher import DispatchError, GPUDispatcher, cut_slices, discover_devices
from gunicorn_llm.settings import USAGE_ERROR, load_settings


def preflight() -> int:
    """0 and the model's folder on stdout when the server can start; else a one-line error and status 2."""
    settings = load_settings()
    if settings.infer_type == "vllm":
        if importlib.util.find_spec("vllm") is None:
            print("error: --infer_type vllm: vLLM is not installed (pip install -r requirements-vllm-gpu.txt on "
                  "GPU machines, requirements-vllm-cpu.txt without a GPU)", file=sys.stderr)
            return USAGE_ERROR
    elif settings.quantization:
        print(
            "error: --quantization applies to the vLLM engine; the transformers engine reads a checkpoint's "
            "quantization from its config.json",
            file=sys.stderr,
        )
        return USAGE_ERROR
    try:
        if settings.api_key_file and not settings.api_keys():
            print(f"error: --api-key-file {settings.api_key_file} holds no key", file=sys.stderr)
            return USAGE_ERROR
    except OSError as error:
        print(f"error: --api-key-file: {error.strerror}: {settings.api_key_file}", file=sys.stderr)
        return USAGE_ERROR
    try:
        devices = discover_devices(settings.gpu_ids, settings.cuda_visible_devices, settings.cpu_workers)
        dispatcher = GPUDispatcher(cut_slices(devices, settings.per_proc_gpus), settings.workers_per_gpu,
                                   settings.dispatcher_state)
        if dispatcher.free_slice_count(os.getpid()) == 0:
            print(f"error: no free GPU slice on this host: every slice is held by another server "
                  f"(see {settings.dispatcher_state})", file=sys.stderr)
            return USAGE_ERROR
        check_parser_settings(settings)
        model_dir = resolve_model(settings.model_name)
        if settings.tool_call_parser or settings.reasoning_parser:  # the parsers fit the model's tokenizer
            from transformers import AutoTokenizer

            logging.getLogger("vllm").setLevel(logging.ERROR)  # its import's notes are the worker's to log

            load_output_parser(settings, AutoTokenizer.from_pretrained(
                model_dir, trust_remote_code=settings.trust_remote_code))
        if settings.infer_type == "vllm" and dispatcher.slices[0].is_cpu:
            cpu_kv_cache_bytes(model_dir, settings)  # raises when the model cannot fit in the free memory
        print(model_dir)
    except (DispatchError, ModelNotFoundError, CpuMemoryError, OutputParserError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    sys.exit(preflight())

"""How much memory vLLM may reserve for its KV cache when it runs on CPU, sized from the memory actually free.

vLLM's CPU build reads `--gpu-memory-utilization` as a share of the machine's *total* memory and refuses to start
when that much is not free: with 0.9 it fails on any machine where other processes use more than a tenth. Here
the share applies to the memory *available now*, split between the server's CPU workers (each loads its own
engine), less each worker's weights and runtime; the KV cache gets what is left, up to a cap (a cache far larger
than a few hundred full-length sequences only takes memory from the rest of the machine). The result goes to vLLM
as an explicit KV cache size, which its start-up check accepts.

`VLLM_CPU_KVCACHE_SPACE` (GiB), when set, is the operator's choice and is used as it is.

The launcher's pre-flight calls the same function, so a server that cannot fit stops before gunicorn starts, with
a message that says what to lower.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil

GIB = 1024**3
# A worker's memory besides weights and KV cache (Python, torch, vLLM, activations). Measured on the embedded model
# (engine in the worker, float32, 1 GiB cache, after a request): 2.7 GiB resident, 1.2 GiB of it neither weights
# nor cache; rounded up.
RUNTIME_BYTES = 2 * GIB
KV_CACHE_CAP_BYTES = 4 * GIB
BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}


class CpuMemoryError(Exception):
    """The model and the smallest useful KV cache do not fit in the memory that is free; the message says why."""


def cpu_kv_cache_bytes(model_dir: str | Path, settings, available: int | None = None) -> int | None:
    """The KV cache size for one CPU worker, or None when VLLM_CPU_KVCACHE_SPACE decides it."""
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return None
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = settings.weights_dtype(on_gpu=False)
    element = BYTES_PER_ELEMENT.get(dtype, 4)
    weights = _weights_bytes(Path(model_dir), config, element)
    per_token = _kv_bytes_per_token(config, element)
    context = settings.max_model_len or config.get("max_position_embeddings") or 2048
    smallest = per_token * context  # one sequence of the full context
    available = psutil.virtual_memory().available if available is None else available
    share = int(available * settings.gpu_memory_utilization / settings.cpu_workers)
    budget = share - weights - RUNTIME_BYTES
    if budget < smallest:
        raise CpuMemoryError(
            f"vLLM on CPU does not fit: {available / GIB:.1f} GiB of memory is free; "
            f"--gpu-memory-utilization {settings.gpu_memory_utilization} of it over {settings.cpu_workers} "
            f"worker(s) gives each {share / GIB:.2f} GiB, and each needs {weights / GIB:.2f} GiB of weights "
            f"({dtype}), about {RUNTIME_BYTES / GIB:.0f} GiB of runtime and {smallest / GIB:.2f} GiB of KV cache for "
            f"one {context}-token sequence. Lower --cpu-workers or --max-model-len, raise --gpu-memory-utilization, "
            f"or free memory (VLLM_CPU_KVCACHE_SPACE=GiB sets the KV cache size directly)"
        )
    return min(budget, KV_CACHE_CAP_BYTES)


def _weights_bytes(model_dir: Path, config: dict, element: int) -> int:
    """The weights' size once loaded: the checkpoint's files, rescaled when the serving dtype is wider."""
    on_disk = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))
    stored = BYTES_PER_ELEMENT.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), 4)
    return on_disk * element // stored


def _kv_bytes_per_token(config: dict, element: int) -> int:
    text = config.get("text_config", config)
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    kv_heads = text.get("num_key_value_heads") or heads
    return 2 * text["num_hidden_layers"] * kv_heads * head_dim * element

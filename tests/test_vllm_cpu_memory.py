"""vLLM on CPU on a machine that is in use: the KV cache is sized from the memory free now
(gunicorn_llm/engines/cpu_memory.py).

vLLM's CPU build alone refuses to start when --gpu-memory-utilization (0.9) of the machine's *total* memory is not
free. Here: the sizing rule on given figures; the launcher refusing, with what to lower, when the model cannot fit;
and a real server starting and answering while a ballast process holds a fifth of the machine's memory.
"""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from gunicorn_llm.engines.cpu_memory import GIB, KV_CACHE_CAP_BYTES, CpuMemoryError, cpu_kv_cache_bytes
from gunicorn_llm.settings import ServerSettings
from test_launcher import assert_refused, launch


@pytest.fixture
def settings(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    return ServerSettings()


def test_plenty_of_free_memory_gives_the_capped_cache(embedded_model_dir, settings):
    assert cpu_kv_cache_bytes(embedded_model_dir, settings, available=20 * GIB) == KV_CACHE_CAP_BYTES


def test_the_cache_shrinks_with_the_free_memory_and_the_workers_sharing_it(embedded_model_dir, settings):
    one = cpu_kv_cache_bytes(embedded_model_dir, settings, available=5 * GIB)
    two = cpu_kv_cache_bytes(embedded_model_dir, settings.model_copy(update={"cpu_workers": 2}), available=8 * GIB)
    assert 0 < two < one < KV_CACHE_CAP_BYTES
    # 0.9 x 5 GiB, less the float32 weights (twice the bf16 checkpoint) and 2 GiB of runtime
    weights = 2 * sum(path.stat().st_size for path in embedded_model_dir.glob("*.safetensors"))
    assert one == int(5 * GIB * 0.9) - weights - 2 * GIB


def test_too_little_memory_is_refused_naming_what_to_lower(embedded_model_dir, settings):
    with pytest.raises(CpuMemoryError, match="Lower --cpu-workers or --max-model-len"):
        cpu_kv_cache_bytes(embedded_model_dir, settings, available=2 * GIB)


def test_an_explicit_kv_cache_space_is_left_to_vllm(embedded_model_dir, settings, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert cpu_kv_cache_bytes(embedded_model_dir, settings, available=GIB // 2) is None


def test_the_launcher_refuses_a_server_that_cannot_fit_before_gunicorn_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    result = launch(tmp_path, "--infer_type", "vllm", "--cpu-workers", "200")
    assert_refused(result, "vLLM on CPU does not fit", "GiB of memory is free", "Lower --cpu-workers")


BALLAST = """
import signal, sys
size = int(sys.argv[1])
ballast = bytearray(size)
ballast[::4096] = b"\\x01" * len(range(0, size, 4096))  # touch every page: resident, not just reserved
print("held", flush=True)
signal.pause()
"""


@pytest.mark.timeout(600)
def test_a_server_starts_and_answers_while_a_fifth_of_the_memory_is_taken(start_server, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    total = psutil.virtual_memory().total
    ballast = subprocess.Popen([sys.executable, "-c", BALLAST, str(total // 5)], stdout=subprocess.PIPE, text=True)
    try:
        assert ballast.stdout.readline().strip() == "held"
        server = start_server("--infer_type", "vllm", "--cpu-workers", "1")
        server.wait_until_ready(workers=1, timeout_s=400)
        assert server.infer(["The capital of France is"], temperature=0, max_tokens=4)
        assert "GiB for KV cache" in server.log()  # vLLM took the size given, not its share of the total
    finally:
        ballast.kill()
        ballast.wait(timeout=30)

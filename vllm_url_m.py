"""gunicorn's application for the vLLM engine (`vllm_url_m:app`, chosen by `--infer_type vllm`).

The engine is gunicorn_llm/engines/vllm_engine.py; the routes are gunicorn_llm/http/. The app starts loading the
model in the background when it is built, in each worker after the fork.
"""

from gunicorn_llm.engines.vllm_engine import VLLMEngine
from gunicorn_llm.engines.vllm_frontend import SharedCoreVLLMEngine
from gunicorn_llm.http.app import app_for
from gunicorn_llm.settings import load_settings

# --workers-per-gpu K > 1: the slice's K workers are front ends of one engine core (gunicorn_llm/ops/slice_engines.py)
app = app_for(SharedCoreVLLMEngine if load_settings().shares_vllm_engine_core else VLLMEngine)

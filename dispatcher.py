"""The file-locked GPU dispatcher that gives each gunicorn worker its slice of GPUs (gunicorn_conf.py's post_fork
asks it). It lives in gunicorn_llm/ops/dispatcher.py; this name is kept for the scripts and readers that know it.
"""

from gunicorn_llm.ops.dispatcher import GPUDispatcher, NoFreeSliceError, cut_slices, discover_devices, pin_slice

__all__ = ["GPUDispatcher", "NoFreeSliceError", "cut_slices", "discover_devices", "pin_slice"]

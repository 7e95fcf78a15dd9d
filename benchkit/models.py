"""Random-weight models shaped like real ones, for machines without network (they cannot download a model).

A shape is the embedded model's config (SmolLM2-135M) with some sizes changed; the weights are drawn with seed 0 on
the CPU in bf16, so that every script builds the same model from the same config and tokenizer folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES = {  # SmolLM2 sizes; 135m is the embedded model's own config; 8b: a Llama-3-8B-sized one (grouped KV heads)
    "135m": {},
    # the real vocabulary over a model whose layers cost next to nothing: the host-side costs of a GPU, on a CPU
    "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2, "head_dim": 32},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32, "head_dim": 64},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128},
}


def add_model_arguments(cli: argparse.ArgumentParser) -> None:
    """The command line of a script that draws a model: the folder it copies the config and tokenizer from, and the
    shape."""
    cli.add_argument("source", type=Path, help="folder with the model's config.json and tokenizer")
    cli.add_argument("--shape", choices=SHAPES, default="135m")


def add_probe_arguments(cli: argparse.ArgumentParser) -> None:
    """The in-process probes' command line: the model, and N requests (several Ns) of P prompt and O new tokens."""
    add_model_arguments(cli)
    cli.add_argument("--requests", type=int, nargs="+", default=[64, 256])
    cli.add_argument("--prompt-len", type=int, default=128)
    cli.add_argument("--output-len", type=int, default=128)


def probe_prompts(count: int, length: int) -> list[list[int]]:
    """`count` distinct prompts of `length` token ids, the same in every run."""
    return [[(7 * i + j) % 30000 + 100 for j in range(length)] for i in range(count)]


def random_model(source: str | Path, shape: str, device: str | None = None):
    """A random-weight causal LM of `shape` from the config in `source`, in eval mode on `device` (default: the GPU
    when there is one; on CPU the scripts only check themselves)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # drawn on the CPU
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def build_model(source: Path, shape: str, target: Path, keep_eos: bool = False) -> None:
    """Save a random-weight model of `shape`, with the tokenizer of `source`, into `target`. Built on the CPU: the
    script that builds it stays off the GPUs. Without `keep_eos` its generation config has no EOS, so that every
    server generates exactly the asked length."""
    from transformers import AutoTokenizer

    random_model(source, shape, device="cpu").save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    if not keep_eos:
        config = json.loads((target / "generation_config.json").read_text())
        config.pop("eos_token_id", None)
        (target / "generation_config.json").write_text(json.dumps(config))

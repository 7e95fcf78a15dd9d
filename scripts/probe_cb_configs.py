"""transformers' continuous batching in-process, without HTTP, under the settings this server can choose.

The ceiling the server's transformers engine works under: for each setting, N requests of P prompt tokens and O
new tokens (EOS ignored, greedy) run through `generate_batch` on a random-weight Llama of the given shape, after a
warm-up (CUDA graph capture). Prints output tok/s per setting. The settings:

- greedy: a plain greedy config (what `transformers serve --continuous-batching` runs for a greedy request);
- per-request sampling: the processors this server's engine installs so that each request can bring its own
  temperature, top-k and top-p (every row pays for the top-k and top-p sorts);
- each of those with CUDA graphs and asynchronous batching forced on (transformers turns them off by default
  when the attention needs a mask, as SDPA does).

Usage: python scripts/probe_cb_configs.py CONFIG_AND_TOKENIZER_DIR [--shape 135m|1.7b] [--requests 64 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchkit, gunicorn_llm
from benchkit.models import add_probe_arguments, probe_prompts, random_model  # noqa: E402


def generation_config(per_request_sampling: bool, new_tokens: int) -> GenerationConfig:
    common = {"max_new_tokens": new_tokens, "eos_token_id": -1, "pad_token_id": 0}
    # as gunicorn_llm/engines/transformers_continuous.py builds it; top_k=1 per request means greedy
    if per_request_sampling:
        return GenerationConfig(do_sample=True, temperature=0.5, top_k=50, top_p=0.5, **common)
    return GenerationConfig(do_sample=False, **common)


def run(model, prompts, config: GenerationConfig, cb: dict) -> float:
    def generate(batch):  # a fresh config each time: transformers resolves its automatic fields in place
        return model.generate_batch(batch, generation_config=config, progress_bar=False,
                                    continuous_batching_config=ContinuousBatchingConfig(max_memory_percent=0.5, **cb))

    generate(prompts[:8])  # warm-up: graph capture, allocator
    started = time.perf_counter()
    results = generate(prompts)
    elapsed = time.perf_counter() - started
    tokens = sum(len(result.generated_tokens) for result in results.values())
    return tokens / elapsed


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probe_arguments(cli)
    options = cli.parse_args()
    model = random_model(options.source, options.shape)
    settings = {
        "greedy": (False, {}),
        "greedy + graphs + async": (False, {"use_cuda_graph": True, "use_async_batching": True}),
        "per-request sampling": (True, {"per_request_processors": True}),
        "per-request sampling + graphs + async": (
            True, {"per_request_processors": True, "use_cuda_graph": True, "use_async_batching": True}),
    }
    print(f"{options.shape}: attention {model.config._attn_implementation}; torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    print("| setting | " + " | ".join(f"{n} requests (tok/s)" for n in options.requests) + " |")
    print("| --- | " + " | ".join("---" for _ in options.requests) + " |")
    for name, (per_request, cb) in settings.items():
        figures = []
        for count in options.requests:
            prompts = probe_prompts(count, options.prompt_len)
            try:
                figures.append(f"{run(model, prompts, generation_config(per_request, options.output_len), cb):.0f}")
            except Exception as error:  # noqa: BLE001 - a setting this transformers refuses is a finding too
                figures.append(f"failed: {type(error).__name__}: {str(error)[:80]}")
        print(f"| {name} | " + " | ".join(figures) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Which batching the transformers engine uses on CPU: batched `generate` vs transformers' continuous batching.

Runs both, side by side in one process, on the embedded model: 16 requests x 32 new tokens (EOS ignored), greedy,
in float32 (the engine's CPU default) and bfloat16. Prints output tokens/s for each.

Usage: python scripts/bench_cpu_batching.py
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from gunicorn_llm.engines.model_store import embedded_model_dir

REQUESTS, NEW_TOKENS = 16, 32


def main() -> None:
    folder = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    prompts = [f"Write a long story about dragon number {i}." for i in range(REQUESTS)]
    print(f"| dtype | batched generate (tok/s) | continuous batching (tok/s) | "
          f"{REQUESTS} requests x {NEW_TOKENS} tokens |")
    print("| --- | --- | --- | --- |")
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                  eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            model.generate(**inputs, generation_config=config)  # warm-up
            start = time.perf_counter()
            model.generate(**inputs, generation_config=config)
            batched = REQUESTS * NEW_TOKENS / (time.perf_counter() - start)
        # Continuous batching runs its own thread and must be called outside inference mode.
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        model.generate_batch(ids, generation_config=config)  # warm-up
        start = time.perf_counter()
        outputs = model.generate_batch(ids, generation_config=config)
        elapsed = time.perf_counter() - start
        generated = sum(len(o.generated_tokens) for o in outputs.values())
        if generated != REQUESTS * NEW_TOKENS:
            raise SystemExit(f"continuous batching generated {generated} of {REQUESTS * NEW_TOKENS} tokens")
        print(f"| {str(dtype).removeprefix('torch.')} | {batched:.1f} | {generated / elapsed:.1f} | |", flush=True)


if __name__ == "__main__":
    main()

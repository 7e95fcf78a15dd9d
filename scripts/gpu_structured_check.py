"""Structured outputs on a GPU: the transformers engine's slot batching with CUDA graphs (the path CPU tests cannot
reach), and the vLLM engine when `--infer_type vllm` is given.

Builds a random-weight model (benchkit/models.py; its EOS kept, so a finished grammar can end a row), starts this
server on GPU 0 with its defaults, and sends 32 constrained requests (a JSON schema, a choice, a regex; greedy and
sampled) at once with 32 unconstrained greedy ones. Prints how many constrained answers conform, and how many of
the first 4 unconstrained answers equal the same prompt's answer when it ran alone, beside the constrained rows and,
as the control, beside the same 32 requests unconstrained (a batch's make-up changes the kernels' shapes and so can
change a greedy answer by itself, most in bf16: `--dtype float32` narrows that), then a closing line
`structured outputs on GPU (ENGINE): N/F finished answers conform (C of 32 cut at max_tokens), M/4 ...`.

Usage: python scripts/gpu_structured_check.py CONFIG_AND_TOKENIZER_DIR [--shape 1.7b] [--infer_type vllm]
           [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root: benchkit
from benchkit.models import add_model_arguments, build_model  # noqa: E402
from benchkit.servers import ServerProcess, Servers  # noqa: E402

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer",
          "minimum": 0, "maximum": 9}}, "required": ["answer", "score"], "additionalProperties": False}
CHOICES = ["red", "green", "blue"]
REGEX = r"[0-9]{3}-[a-z]{2}"
CONSTRAINTS = [({"json": SCHEMA}, lambda text: set(json.loads(text)) == {"answer", "score"}
                and json.loads(text)["answer"] in ("yes", "no") and 0 <= json.loads(text)["score"] <= 9),
               ({"choice": CHOICES}, lambda text: text in CHOICES),
               ({"regex": REGEX}, lambda text: re.fullmatch(REGEX, text) is not None)]


def complete(url: str, prompt: str, **body) -> tuple[str, str]:
    """The answer's text and finish reason."""
    answer = requests.post(f"{url}/v1/completions", json={"prompt": prompt, **body}, timeout=300)
    answer.raise_for_status()
    choice = answer.json()["choices"][0]
    return choice["text"], choice["finish_reason"]


def conforms(check, text: str) -> bool:
    try:
        return bool(check(text))
    except (ValueError, TypeError, KeyError):
        return False


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(cli)
    cli.add_argument("--infer_type", default="transformers")
    cli.add_argument("--dtype", default="auto", help="this server's --dtype")
    options = cli.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu-structured-"))
    model = work / "model"
    build_model(options.source, options.shape, model, keep_eos=True)
    plain = [f"Item {i}: the weather today is" for i in range(32)]
    with Servers() as servers:
        server = servers.add(ServerProcess.launch(
            ["--model_name", str(model), "--infer_type", options.infer_type, "--gpu-memory-utilization", "0.3",
             "--max-model-len", "1024", "--dtype", options.dtype], work / "server.log"))
        server.wait_loaded(1, 600)
        alone = [complete(server.url, prompt, max_tokens=24, temperature=0) for prompt in plain[:4]]
        constrained = [(CONSTRAINTS[i % 3], {"structured_outputs": CONSTRAINTS[i % 3][0], "max_tokens": 48,
                        "temperature": 0 if i % 2 else 0.8, "seed": i}) for i in range(32)]

        def beside(bodies: list[dict]) -> tuple[list, list]:
            """The 32 requests of `bodies` sent at once with the 32 unconstrained greedy ones: both answers."""
            with ThreadPoolExecutor(64) as pool:
                shaped = [pool.submit(complete, server.url, f"Question {i}, answer in the asked format:", **body)
                          for i, body in enumerate(bodies)]
                free = [pool.submit(complete, server.url, prompt, max_tokens=24, temperature=0) for prompt in plain]
                return [future.result() for future in shaped], [future.result() for future in free]

        _, control_texts = beside([{k: v for k, v in body.items() if k != "structured_outputs"}
                                   for _, body in constrained])
        shaped_texts, free_texts = beside([body for _, body in constrained])
        # A random model can fill max_tokens with the whitespace JSON allows: such an answer is cut, not wrong.
        finished = [(check, text) for ((_, check), _), (text, reason) in zip(constrained, shaped_texts, strict=True)
                    if reason == "stop"]
        ok = sum(conforms(check, text) for check, text in finished)
        unchanged = sum(a == b for a, b in zip(alone, free_texts[:4], strict=True))
        unchanged_control = sum(a == b for a, b in zip(alone, control_texts[:4], strict=True))
        for ((constraint, _), body), (text, reason) in list(zip(constrained, shaped_texts, strict=True))[:6]:
            print(f"{list(constraint)[0]:>6} temperature {body['temperature']}: {reason:>6} {text[:60]!r}")
        print(f"structured outputs on GPU ({options.infer_type}): {ok}/{len(finished)} finished answers conform "
              f"({len(constrained) - len(finished)} of {len(constrained)} cut at max_tokens), "
              f"{unchanged}/{len(alone)} unconstrained answers unchanged beside them, {unchanged_control}/{len(alone)} "
              f"beside the same requests unconstrained (--dtype {options.dtype})", flush=True)


if __name__ == "__main__":
    main()

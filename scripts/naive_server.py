"""The naive way to serve a transformers model, as a baseline for benchmarks: one `generate` per request.

A lock lets one request at a time use the model (what a plain Flask app around `model.generate` amounts to), so
concurrent clients queue. It speaks just enough of OpenAI's streaming `/v1/completions` (SSE chunks, then a usage
chunk and `[DONE]`) for bench.py to time it like the other servers. Not part of the server: a yardstick.

Usage: python scripts/naive_server.py MODEL_DIR PORT
"""

from __future__ import annotations

import json
import sys
import threading

import torch
from flask import Flask, Response, request
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

model_dir, port = sys.argv[1], int(sys.argv[2])
device = "cuda" if torch.cuda.is_available() else "cpu"
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device).eval()
model_lock = threading.Lock()
app = Flask(__name__)


@app.get("/health")
def health():
    return {"status": "ok"}


@app.get("/v1/models")
def models():
    return {"object": "list", "data": [{"id": model_dir, "object": "model"}]}


@app.post("/v1/completions")
def completions():
    body = request.get_json()
    prompt = body["prompt"]
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt], device=device)
    max_tokens = int(body.get("max_tokens", 16))
    # EOS ignored: exactly max_tokens new tokens, as the benchmark asks of every server.
    suppress_eos = {"min_new_tokens": max_tokens} if body.get("ignore_eos") else {}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    generated = []

    def generate():
        with model_lock, torch.inference_mode():
            output = model.generate(input_ids, max_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                                    pad_token_id=tokenizer.eos_token_id, **suppress_eos)
        generated.append(output.shape[1] - input_ids.shape[1])

    def events():
        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        for text in streamer:
            if text:
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': text}]})}\n\n"
        worker.join()
        usage = {"prompt_tokens": input_ids.shape[1], "completion_tokens": generated[0],
                 "total_tokens": input_ids.shape[1] + generated[0]}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return Response(events(), mimetype="text/event-stream")


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=port, threaded=True)

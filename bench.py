"""Benchmark client for LLM servers: throughput and latency over a concurrency sweep, one or several servers.

Talks to this server's `/infer` and `/generate`, and to any OpenAI-compatible `/v1/completions` or
`/v1/chat/completions` (this server, vLLM, `transformers serve`). Requests stream, so that time to first token
(TTFT), time per output token (TPOT) and inter-token latency (ITL) are measured as the client sees them;
`--no-stream` asks for whole answers instead (only end-to-end latency then).

- Prompts have an exact token length: random token ids (or one repeated sentence) decoded to text and re-encoded
  until the text is `--prompt-len` tokens for the tokenizer (`--tokenizer`, default the embedded model).
- Every request asks for exactly `--output-len` tokens with end-of-sequence ignored, greedy. Output tokens are the
  server's usage count when it sends one, else the answer's text re-tokenized (never characters); a request that
  came back with another length is reported, since it would skew TPOT.
- For each concurrency C, C client threads keep C requests in flight until `--requests-per-level` are done (or
  `--duration` seconds passed). With several servers the runs are interleaved: per level and repeat, one run on
  each server, alternating the order, so that drift on a noisy machine hits all alike; `--repeats` K gives the
  median of K runs and the ratio of every server to the first.

Prints one table row per server and concurrency, writes every run to `--json` and a plot to `--plot` (when
matplotlib is installed). Exit status 1 when any request failed.

    python bench.py --url http://127.0.0.1:5002 --concurrency 1 8 32 64 --prompt-len 128 --output-len 128
    python bench.py --url ours=http://127.0.0.1:5002@completions --url hf=http://127.0.0.1:8000@hf-completions \\
        --concurrency 1 8 32 64 --repeats 3 --json bench.json --plot bench.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

# This file is the command line; the client (protocols, requests, runs, figures, output) is the toolkit's.
from benchkit.client import PROTOCOLS, Server, run_level
from benchkit.prompts import PromptMaker, load_tokenizer
from benchkit.report import number, print_ratios, print_table, write_plot
from benchkit.stats import combine_repeats, count_output_tokens, ratios, summarize


def parse_server(spec: str, index: int, default_protocol: str) -> Server:
    """`[NAME=]URL[@PROTOCOL]`, e.g. `ours=http://127.0.0.1:5002@infer`."""
    name, _, url = spec.partition("=") if "=" in spec.split("://")[0] else ("", "", spec)
    protocol = default_protocol
    if "@" in url and url.rsplit("@", 1)[1] in PROTOCOLS:
        url, protocol = url.rsplit("@", 1)
    if not url.startswith(("http://", "https://")):
        raise SystemExit(f"error: --url {spec!r}: expected [NAME=]http(s)://HOST:PORT[@PROTOCOL]")
    return Server(name or urlsplit(url).netloc or f"server{index}", url.rstrip("/"), protocol)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--url", action="append", required=True, metavar="[NAME=]URL[@PROTOCOL]",
                     help="a server to measure (repeatable); the first is the baseline of the ratios")
    cli.add_argument("--protocol", choices=list(PROTOCOLS), default="completions",
                     help="for URLs without @PROTOCOL (default completions); hf-completions and hf-chat are the "
                          "OpenAI routes of `transformers serve`, which refuses ignore_eos")
    cli.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    cli.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    cli.add_argument("--output-len", type=int, default=128, help="output tokens, EOS ignored (default 128)")
    cli.add_argument("--prompts", choices=("random", "fixed"), default="random",
                     help="random token ids, different per request (default), or one fixed sentence repeated")
    amount = cli.add_mutually_exclusive_group()
    amount.add_argument("--requests-per-level", type=int, help="requests per run (default max(4 x C, 16))")
    amount.add_argument("--duration", type=float, help="seconds per run instead of a request count")
    cli.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                     help="stream answers (default); --no-stream: whole answers, end-to-end latency only")
    cli.add_argument("--warmup", type=int, default=2, help="unmeasured requests per server first (default 2)")
    cli.add_argument("--repeats", type=int, default=1, help="runs per server and level; the median is reported")
    cli.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                     help="with several servers: per level and repeat one run on each (default), alternating order")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--tokenizer", help="tokenizer folder or name (default: the embedded model)")
    cli.add_argument("--model", help="model name for the OpenAI routes (default: left out, the server's own)")
    cli.add_argument("--api-key", help="sent as Authorization: Bearer")
    cli.add_argument("--timeout", type=float, default=600, help="seconds a request may wait for a byte (600)")
    cli.add_argument("--json", type=Path, help="write every run and the summary here")
    cli.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    cli.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    cli.add_argument("--client-processes", type=int, default=1,
                     help="split each run's clients over this many processes, for thousands of tokens a second "
                          "(default 1; with more, progress shows per run, not per request)")
    options = cli.parse_args(argv)
    if min(options.concurrency + [options.prompt_len, options.output_len, options.repeats,
                                  options.client_processes]) < 1:
        cli.error("--concurrency, --prompt-len, --output-len, --repeats and --client-processes must be at least 1")
    options.servers = [parse_server(spec, i, options.protocol) for i, spec in enumerate(options.url)]
    if len({s.name for s in options.servers}) != len(options.servers):
        cli.error("two --url have the same name: label them NAME=URL")
    return options


def schedule(servers: list[Server], levels: list[int], repeats: int, interleave: bool):
    """(server, level, repeat) in run order. Interleaved: each level and repeat on every server back to back, the
    order reversed from one such slot to the next, so that no server always runs first."""
    if not interleave:
        return [(s, c, r) for s in servers for c in levels for r in range(repeats)]
    slots = [(c, r) for c in levels for r in range(repeats)]
    return [(s, c, r) for slot, (c, r) in enumerate(slots) for s in (servers if slot % 2 == 0 else servers[::-1])]


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    servers, levels = options.servers, options.concurrency
    tokenizer = load_tokenizer(options.tokenizer)
    prompt_maker = PromptMaker(tokenizer, options.prompt_len, options.prompts)
    for server in servers:
        print(f"{server.name}: {server.url} ({server.protocol}, {PROTOCOLS[server.protocol].path})", flush=True)

    if options.warmup:
        for server in servers:
            outcomes, _, _ = run_level(server, prompt_maker.make(options.warmup, f"{options.seed}-warmup"),
                                       min(options.warmup, max(levels)), options, f"{server.name} warm-up")
            failed = [o.error for o in outcomes if o.error]
            if failed:
                print(f"warning: {server.name}: {len(failed)} of {len(outcomes)} warm-up requests failed: "
                      f"{failed[0]}", flush=True)

    prompts: dict[tuple[int, int], list[str]] = {}  # the same prompts for every server at one level and repeat
    runs: dict[tuple[str, int], list[dict]] = {(s.name, c): [] for s in servers for c in levels}
    for server, level, repeat in schedule(servers, levels, options.repeats, options.interleave):
        count = options.requests_per_level or max(4 * level, 16)
        if options.duration:
            count = max(256, 2 * level)  # a pool to cycle through
        if (level, repeat) not in prompts:
            prompts[(level, repeat)] = prompt_maker.make(count, f"{options.seed}-{level}-{repeat}")
        label = f"{server.name} c={level} [{repeat + 1}/{options.repeats}]"
        outcomes, elapsed, cpu = run_level(server, prompts[(level, repeat)], level, options, label, options.duration)
        count_output_tokens(outcomes, tokenizer)
        run = summarize(outcomes, elapsed, cpu, options)
        runs[(server.name, level)].append(run)
        print(f"{label}: {run['requests'] - run['failures']} ok, {run['failures']} failed, "
              f"{number(run['output_tok_s'])} output tok/s, TTFT p50 {number(run['ttft_ms_p50'])} ms, "
              f"TPOT p50 {number(run['tpot_ms_p50'])} ms", flush=True)

    summary = {key: combine_repeats(level_runs) for key, level_runs in runs.items()}
    title = (f"{options.prompt_len} prompt tokens ({options.prompts}), {options.output_len} output tokens (EOS "
             f"ignored), greedy; median of {options.repeats} run(s)")
    print(f"\n{title}, requests summed over them\n")
    print_table(summary, servers, levels)
    ratio_rows = ratios(summary, servers, levels) if len(servers) > 1 else []
    if ratio_rows:
        print_ratios(ratio_rows)

    spread = [(name, level, s["per_worker"]) for (name, level), s in summary.items() if len(s["per_worker"]) > 1]
    if spread:
        print("\nanswered requests per worker (X-Worker-Pid)")
        for name, level, counts in spread:
            print(f"  {name} c={level}: " + ", ".join(f"{pid}: {n}" for pid, n in sorted(counts.items())))

    exit_status = 0
    for (name, level), s in summary.items():
        if s["wrong_output_len"]:
            why = ("counted by re-tokenizing the text, which can be a token or two off; far fewer means the server "
                   "stopped early" if "text" in s["output_counted_from"] else
                   "counted by the server: it stopped early or ignored the length; TPOT compares unequal work")
            print(f"warning: {name} c={level}: {s['wrong_output_len']} of {s['requests'] - s['failures']} answers "
                  f"were not {options.output_len} tokens long ({s['output_len_min']}-{s['output_len_max']}), {why}")
        if s["failures"]:
            exit_status = 1
            errors = "; ".join(f"{count} x {message}" for message, count in s["errors"].items())
            print(f"error: {name} c={level}: {s['failures']} of {s['requests']} requests failed: {errors}")

    if options.json:
        config = {key: value for key, value in vars(options).items() if key not in ("servers", "url", "api_key")}
        document = {
            "config": {**config, "json": str(options.json), "plot": options.plot and str(options.plot)},
            "servers": [vars(s) for s in servers],
            "runs": [{"server": name, "concurrency": level, "repeat": repeat, **run}
                     for (name, level), level_runs in runs.items() for repeat, run in enumerate(level_runs)],
            "summary": [{"server": name, "concurrency": level, **s} for (name, level), s in summary.items()],
            "ratios": ratio_rows,
        }
        options.json.write_text(json.dumps(document, indent=1))
        print(f"\nwrote {options.json}")
    if options.plot:
        if write_plot(options.plot, summary, servers, levels, title):
            print(f"wrote {options.plot}")
        else:
            print("no plot: matplotlib is not installed (pip install matplotlib); the JSON has every figure")
    return exit_status


if __name__ == "__main__":
    sys.exit(main())

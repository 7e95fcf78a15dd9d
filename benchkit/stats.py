"""The benchmark client's figures: output tokens counted, one run summarized (throughput; TTFT, TPOT, ITL and
end-to-end latency percentiles), repeats combined, and every server's ratio to the first.
"""

from __future__ import annotations

import itertools
import statistics
from collections import Counter

from benchkit.client import Outcome, Server

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2e")  # each reported in ms: mean, p50, p90, p99
# Counts add up over repeats; every other number of a level is the median of its repeats.
SUMMED = ("requests", "failures", "input_tokens", "output_tokens", "wrong_output_len")


def percentiles(values: list[float]) -> list[float | None]:
    """p50, p90, p99 (linear interpolation, numpy's default); None for no values."""
    if not values:
        return [None] * len(PERCENTILES)
    try:
        import numpy

        return [float(v) for v in numpy.percentile(values, PERCENTILES)]
    except ImportError:
        ordered = sorted(values)
        result = []
        for p in PERCENTILES:
            position = (len(ordered) - 1) * p / 100
            low = int(position)
            high = min(low + 1, len(ordered) - 1)
            result.append(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
        return result


def count_output_tokens(outcomes: list[Outcome], tokenizer) -> None:
    """Output tokens from the server's usage, else from the answer's text re-tokenized.

    Re-tokenizing is not always the inverse of generating: two "\n" tokens generated one after the other come
    back as one "\n\n" token. So a text count can be a token or two off on arbitrary text.
    """
    to_tokenize = [o for o in outcomes if o.error is None and not (o.usage or {}).get("completion_tokens")]
    if to_tokenize:
        texts = ["".join(o.texts) for o in to_tokenize]
        for outcome, ids in zip(to_tokenize, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True):
            outcome.output_tokens = len(ids)
            outcome.counted_from = "text"
    for outcome in outcomes:
        if outcome.error is None and (outcome.usage or {}).get("completion_tokens"):
            outcome.output_tokens = outcome.usage["completion_tokens"]
            outcome.prompt_tokens = outcome.usage.get("prompt_tokens") or outcome.prompt_tokens


def summarize(outcomes: list[Outcome], elapsed: float, cpu: float, options) -> dict:
    """One run's figures; latencies in ms. Failed requests count only as failures."""
    ok = [o for o in outcomes if o.error is None]
    samples = {
        # Whole answers (--no-stream) have no first-token time.
        "ttft": [o.chunk_times[0] for o in ok if o.chunk_times],
        "tpot": [(o.e2e - o.chunk_times[0]) / (o.output_tokens - 1)
                 for o in ok if o.chunk_times and o.output_tokens > 1],
        "itl": [b - a for o in ok for a, b in itertools.pairwise(o.chunk_times)],
        "e2e": [o.e2e for o in ok],
    }
    input_tokens = sum(o.prompt_tokens for o in ok)
    output_tokens = sum(o.output_tokens for o in ok)
    lengths = [o.output_tokens for o in ok]
    summary = {
        "requests": len(outcomes),
        "failures": len(outcomes) - len(ok),
        "duration_s": elapsed,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / elapsed,
        "total_tok_s": (input_tokens + output_tokens) / elapsed,
        "req_s": len(ok) / elapsed,
        "wrong_output_len": sum(n != options.output_len for n in lengths),
        "output_len_min": min(lengths, default=None),
        "output_len_max": max(lengths, default=None),
        "output_counted_from": "/".join(sorted({o.counted_from for o in ok})) or None,
        # Of one core, summed over the client processes: near 100 x processes would mean the client limits the
        # figures. Meaningless when nothing was answered.
        "client_cpu_pct": 100 * cpu / elapsed if ok else None,
        "client_processes": len({o.client_pid for o in outcomes}),
    }
    for name, values in samples.items():
        summary[f"{name}_ms_mean"] = 1000 * statistics.fmean(values) if values else None
        for p, value in zip(PERCENTILES, percentiles(values), strict=True):
            summary[f"{name}_ms_p{p}"] = None if value is None else 1000 * value
    summary["errors"] = dict(Counter(o.error for o in outcomes if o.error).most_common(5))
    summary["per_worker"] = dict(Counter(o.worker for o in ok if o.worker))
    return summary


def combine_repeats(runs: list[dict]) -> dict:
    """A level's figures over its repeats: counts summed, min/max kept, everything else the median."""
    combined = {}
    for key in runs[0]:
        values = [run[key] for run in runs if run[key] is not None]
        if key == "errors":
            combined[key] = dict(sum((Counter(run[key]) for run in runs), Counter()).most_common(5))
        elif key == "per_worker":
            combined[key] = dict(sum((Counter(run[key]) for run in runs), Counter()))
        elif not values:
            combined[key] = None
        elif isinstance(values[0], str):  # output_counted_from: every source any repeat used
            combined[key] = "/".join(sorted({part for value in values for part in value.split("/")}))
        elif key in SUMMED:
            combined[key] = sum(values)
        elif key.endswith("_min"):
            combined[key] = min(values)
        elif key.endswith("_max"):
            combined[key] = max(values)
        else:
            combined[key] = statistics.median(values)
    return combined


RATIO_METRICS = ("output_tok_s", "total_tok_s", "req_s", "ttft_ms_p50", "tpot_ms_p50", "itl_ms_p50",
                 "e2e_ms_p50", "e2e_ms_p99")


def ratios(summary: dict, servers: list[Server], levels: list[int]) -> list[dict]:
    """Every other server's figures divided by the first server's, per level."""
    rows = []
    baseline = servers[0]
    for other in servers[1:]:
        for level in levels:
            base, this = summary[(baseline.name, level)], summary[(other.name, level)]
            rows.append({
                "concurrency": level, "server": other.name, "baseline": baseline.name,
                **{key: (this[key] / base[key] if this[key] is not None and base[key] else None)
                   for key in RATIO_METRICS},
            })
    return rows

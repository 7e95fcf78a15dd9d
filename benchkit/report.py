"""The benchmark client's output: the table per server and concurrency, the ratios to the first server, the plot.
"""

from __future__ import annotations

from pathlib import Path

from benchkit.client import Server
from benchkit.stats import PERCENTILES, RATIO_METRICS


def number(value, digits: int = 1, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _spread(summary: dict, name: str) -> str:
    return "/".join(number(summary[f"{name}_ms_p{p}"], 0 if (summary[f"{name}_ms_p{p}"] or 0) >= 100 else 1)
                    for p in PERCENTILES)


def print_table(summary: dict, servers: list[Server], levels: list[int]) -> None:
    header = (f"{'server':<16} {'conc':>4} {'reqs':>5} {'fail':>4} {'out tok/s':>9} {'tot tok/s':>9} {'req/s':>6} "
              f"{'TTFT ms p50/90/99':>20} {'TPOT ms p50/90/99':>20} {'ITL ms p50/90/99':>20} "
              f"{'E2E ms p50/90/99':>22} {'client CPU':>10}")
    print(header)
    print("-" * len(header))
    for level in levels:
        for server in servers:
            s = summary[(server.name, level)]
            print(f"{server.name[:16]:<16} {level:>4} {s['requests']:>5} {s['failures']:>4} "
                  f"{number(s['output_tok_s']):>9} {number(s['total_tok_s']):>9} {number(s['req_s'], 2):>6} "
                  f"{_spread(s, 'ttft'):>20} {_spread(s, 'tpot'):>20} {_spread(s, 'itl'):>20} "
                  f"{_spread(s, 'e2e'):>22} {number(s['client_cpu_pct'], 0, '%'):>10}")


def print_ratios(rows: list[dict]) -> None:
    print("\nratio (server / baseline; above 1: more throughput, or slower for latencies)")
    header = (f"{'server / baseline':<28} {'conc':>4} {'out tok/s':>9} {'tot tok/s':>9} {'req/s':>6} "
              f"{'TTFT p50':>8} {'TPOT p50':>8} {'ITL p50':>8} {'E2E p50':>8} {'E2E p99':>8}")
    print(header)
    for row in rows:
        widths = (9, 9, 6, 8, 8, 8, 8, 8)
        values = " ".join(f"{number(row[key], 2):>{width}}" for key, width in zip(RATIO_METRICS, widths, strict=True))
        print(f"{(row['server'] + ' / ' + row['baseline'])[:28]:<28} {row['concurrency']:>4} {values}")


def write_plot(path: Path, summary: dict, servers: list[Server], levels: list[int], title: str) -> bool:
    """Output tok/s and p50 (p90 dashed) TTFT, TPOT and E2E against concurrency; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = (("output_tok_s", None, "output tokens/s"), ("ttft_ms_p50", "ttft_ms_p90", "TTFT (ms)"),
              ("tpot_ms_p50", "tpot_ms_p90", "TPOT (ms)"), ("e2e_ms_p50", "e2e_ms_p90", "end-to-end latency (ms)"))

    def values(server: Server, key: str) -> list[float]:  # a level without figures (all failed) is a gap
        return [float("nan") if summary[(server.name, c)][key] is None else summary[(server.name, c)][key]
                for c in levels]

    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    for axis, (key, p90_key, panel_title) in zip(axes.flat, panels, strict=False):
        for index, server in enumerate(servers):
            color = f"C{index}"
            axis.plot(levels, values(server, key), "o-", color=color,
                      label=f"{server.name} (p50)" if p90_key else server.name)
            if p90_key:
                axis.plot(levels, values(server, p90_key), "--", color=color, alpha=0.6, label=f"{server.name} (p90)")
        axis.set_title(panel_title)
        axis.set_xlabel("concurrency")
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True

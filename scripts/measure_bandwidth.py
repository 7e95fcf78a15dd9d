"""The GPU's memory bandwidth as a device-to-device copy moves it (bytes read plus bytes written per second).

The decode bandwidth limit in docs/benchmarks.md is built on it: one decode step reads every weight once, so a batch
of B sequences cannot produce more than B x bandwidth / weight bytes tokens per second.

Usage: python scripts/measure_bandwidth.py [--gib 4] [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--gib", type=float, default=4.0, help="size of the copied buffer")
    cli.add_argument("--repeats", type=int, default=20)
    options = cli.parse_args()
    source = torch.empty(int(options.gib * 2**30), dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)  # first touch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(options.repeats):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    moved = 2 * source.numel() * options.repeats  # each byte read once and written once
    print(f"{torch.cuda.get_device_name()}: {moved / seconds / 1e12:.2f} TB/s (read + write), "
          f"{options.repeats} copies of {options.gib:g} GiB")


if __name__ == "__main__":
    main()

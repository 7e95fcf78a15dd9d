"""The pace a stand-in for a GPU's model step keeps: a step of PACED_STEP_MS plus PACED_STEP_MS_PER_SEQ per running
sequence, on a fixed grid (Python time between steps, up to a step's length, is absorbed as a GPU would overlap it),
and the tokens it gives: ordinary words over and over, so that decoding them is ordinary work.

Shared by scripts/bench_request_path.py's paced engine (one per worker) and benchkit/paced_executor.py (a paced vLLM
engine core shared by front ends); both read the pace from the environment, which the server's processes inherit.
"""

from __future__ import annotations

import itertools
import os
import time

STEP_MS_ENV, PER_SEQ_MS_ENV = "PACED_STEP_MS", "PACED_STEP_MS_PER_SEQ"
TEXT = ("The request path of a serving worker hands every new token to the thread that answers its client, which "
        "decodes it, finds stop strings, and writes it out as JSON. ")


class Pace:
    def __init__(self):
        self.step_s = float(os.environ[STEP_MS_ENV]) / 1000
        self.per_sequence_s = float(os.environ[PER_SEQ_MS_ENV]) / 1000
        self._next_step = time.monotonic()

    def step(self, sequences: int) -> None:
        """Sleep until the end of a step over `sequences` running sequences."""
        self._next_step = max(self._next_step + self.step_s + self.per_sequence_s * sequences, time.monotonic())
        time.sleep(max(0.0, self._next_step - time.monotonic()))


def paced_tokens(tokenizer):
    """The token ids the paced steps give, one after another, forever."""
    return itertools.cycle(tokenizer.encode(TEXT, add_special_tokens=False))

"""Rank 0's view of progress: throughput over a sliding window, ETA, and log lines."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("trainer")


@dataclass
class Throughput:
    """Samples per second over the last `window` steps, so a slow first step (warm-up,
    JIT builds) or a checkpoint pause fades out instead of skewing the figure forever."""

    window: int = 20
    _marks: deque = field(default_factory=deque)

    def mark(self, samples_total: int, now: float | None = None) -> None:
        self._marks.append((time.monotonic() if now is None else now, samples_total))
        while len(self._marks) > self.window + 1:
            self._marks.popleft()

    def reset(self) -> None:
        self._marks.clear()

    @property
    def samples_per_second(self) -> float:
        if len(self._marks) < 2:
            return 0.0
        (start, first), (end, last) = self._marks[0], self._marks[-1]
        return (last - first) / (end - start) if end > start else 0.0

    @property
    def steps_per_second(self) -> float:
        if len(self._marks) < 2:
            return 0.0
        (start, _), (end, _) = self._marks[0], self._marks[-1]
        return (len(self._marks) - 1) / (end - start) if end > start else 0.0

    def eta_seconds(self, steps_left: int) -> float:
        rate = self.steps_per_second
        return steps_left / rate if rate > 0 else float("nan")


def emit(line: str) -> None:
    if _terminal_bar.active:
        _terminal_bar.write_above(line)
        return
    # One write per line: ranks share torchrun's stdout, and print()'s separate
    # newline write lets lines of two ranks run together.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class TerminalBar:
    """Step lines as one progress bar redrawn in place, for a person at a terminal;
    pipes, files and log collectors get plain lines (a bar there is noise)."""

    def __init__(self):
        self._bar = None

    @property
    def active(self) -> bool:
        return self._bar is not None

    @staticmethod
    def wanted() -> bool:
        return sys.stdout.isatty()

    def update(self, values: dict, summary: str) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=values["max_steps"], initial=values["step"], file=sys.stdout, unit="step",
                             dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}] {postfix}")
        self._bar.n = values["step"]
        self._bar.set_postfix_str(summary)  # also redraws
        if values["step"] >= values["max_steps"]:
            self.close()

    def write_above(self, line: str) -> None:
        self._bar.write(line, file=sys.stdout)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# Rank 0 has one console and one run: the bar is per process.
_terminal_bar = TerminalBar()


def json_safe(values: dict) -> dict:
    """NaN (e.g. an ETA not known yet) and infinities as null: strict JSON parsers
    reject the bare NaN and Infinity that json.dumps writes."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in values.items()}


def format_duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: not known yet
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def report_step(values: dict, *, json_format: bool) -> None:
    if json_format:
        emit(json.dumps({"event": "step", **json_safe(values)}))
        return
    prior = f" prior {values['prior_loss']:.4f}" if values.get("prior_loss") is not None else ""
    figures = (
        f"loss {values['loss']:.4f} "
        f"(instance {values['instance_loss']:.4f}{prior}) lr {values['learning_rate']:.2e} "
        f"{values['samples_per_second']:.2f} samples/s eta {format_duration(values['eta_seconds'])}"
    )
    if _terminal_bar.active or TerminalBar.wanted():
        _terminal_bar.update(values, figures)
        return
    emit(f"step {values['step']}/{values['max_steps']} {figures}")


def report_event(message: str, *, json_format: bool, **fields) -> None:
    if json_format:
        emit(json.dumps({"event": message, **json_safe(fields)}))
    else:
        details = " ".join(f"{key}={value}" for key, value in fields.items())
        emit(f"{message} {details}".rstrip())

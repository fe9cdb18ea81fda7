"""Shared by the benchmark scripts: the machine they ran on, A/B alternation with medians, result files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

# BLENDTUNE_BENCH_RESULTS: where results go instead (gpu_check.py collects a whole check in one folder)
RESULTS = Path(os.environ.get("BLENDTUNE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def alternate(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Calls every run once per round, in rotating order, `repeats` rounds: drift and noise hit all alike.
    Each run returns its own measurement (e.g. seconds for a fixed amount of work)."""
    names = list(runs)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(runs[name]())
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], None], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    began = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - began


def write(name: str, payload: dict, table: list[str], note: str = "") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = f"# {name}\n\nMachine: {payload['machine']}\n\n" + "\n".join(table) + "\n" + (f"\n{note}\n" if note else "")
    (RESULTS / f"{name}.md").write_text(text)
    print(text)

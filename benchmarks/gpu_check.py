"""The whole GPU check in one command (`make gpu-check`), for the minutes a GPU is lent: each part runs in its
own process under its own time limit, a part that fails or runs out of time is reported and the next one
runs, and everything lands in one markdown file.

    python benchmarks/gpu_check.py --out gpu-check.md                 # on the GPU machine (about 8 min, H100)
    python benchmarks/gpu_check.py --device cpu --out /tmp/check.md   # the dry run `make test` keeps working

Parts: the tests that take a device (BLENDTUNE_TEST_DEVICE: every test built on conftest.TINY trains there);
`step_overhead` of every strategy against the best-practice plain loop (bf16, batch 64 and 256, MFU), with
`train.compile` on and off; loader throughput of the CREMA-D layout (files, prepared cache, video); a sweep
of 8 small trials at `sweep.gpus_per_trial=0.25` against 1 GPU per trial (wall time, GPU utilisation); and a
1-worker Ray Train run (NCCL on CUDA) against no Ray (start-up and per-epoch time). The device parts use
AV-digits (`BLENDTUNE_DATA_ROOT`); the dry run uses synthetic data and tiny sizes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
STRATEGIES = ["naive", "ogm", "ogm_ge", "gblend", "mmpareto", "pmr", "mla", "agm", "ume", "umt"]


def parts(device: str) -> list[tuple[str, list[str], int]]:
    """(title, command, seconds allowed) per part: full sizes on a GPU, the smallest that still runs each
    code path on the CPU."""
    bench = str(REPO / "benchmarks")
    if device == "cpu":
        return [
            ("tests on the device", [PYTHON, "-m", "pytest", "-q", "-x", "-p", "no:randomly",
                                     "tests/test_gpu_paths.py::test_data_on_device_gives_the_dataloaders_batches_bit_for_bit"], 60),
            ("step overhead", [PYTHON, f"{bench}/step_overhead.py", "--model", "avdigits", "--batch", "8", "--steps", "2",
                               "--repeats", "1", "--strategies", "naive", "ogm_ge", "--device", "cpu"], 60),
            ("loader throughput", [PYTHON, f"{bench}/loader_throughput.py", "--clips", "8", "--workers", "0",
                                   "--batch", "4", "--repeats", "1"], 60),
            ("sweep packing", ["sweep", "2", "1"], 90),
            ("Ray Train, 1 worker, against no Ray", [PYTHON, f"{bench}/ray_overhead.py", "--epochs", "2", "--repeats", "1",
                                                     "--no-tune", "--experiment", str(REPO / "experiments" / "synthetic_naive.yaml")], 90),
        ]
    return [
        ("tests on the device", [PYTHON, "-m", "pytest", "-q", "-p", "no:randomly", "tests/test_gpu_paths.py",
                                 "tests/test_strategies.py", "-k", "not slow"], 150),
        ("step overhead, bf16", [PYTHON, f"{bench}/step_overhead.py", "--model", "resnet18", "--batch", "64", "256",
                                 "--steps", "20", "--repeats", "3", "--amp", "bf16", "--baseline", "best", "--device", "cuda",
                                 "--gflop-per-sample", "21.3", "--strategies", *STRATEGIES], 150),
        ("step overhead, bf16, train.compile", [PYTHON, f"{bench}/step_overhead.py", "--model", "resnet18", "--batch", "256",
                                                "--steps", "20", "--repeats", "2", "--amp", "bf16", "--baseline", "best",
                                                "--device", "cuda", "--gflop-per-sample", "21.3", "--compile",
                                                "--strategies", "naive", "ogm_ge", "gblend"], 120),
        ("loader throughput", [PYTHON, f"{bench}/loader_throughput.py", "--clips", "256", "--workers", "0", "4", "8",
                               "--repeats", "2", "--video"], 60),
        ("sweep packing", ["sweep", "8", "3"], 120),
        ("Ray Train, 1 worker, against no Ray", [PYTHON, f"{bench}/ray_overhead.py", "--epochs", "3", "--repeats", "1",
                                                 "--no-tune", "--device", "cuda"], 120),
    ]


class GpuSampler:
    """nvidia-smi's utilisation every 0.5 s while a part runs (mean and peak), where there is nvidia-smi."""

    def __init__(self):
        self.samples: list[float] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "500"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def stop(self) -> str:
        if self.proc is None:
            return "n/a (no nvidia-smi)"
        self.proc.terminate()
        if not self.samples:
            return "n/a (no samples)"
        return f"mean {sum(self.samples) / len(self.samples):.0f}%, peak {max(self.samples):.0f}%"


def sweep_packing(device: str, trials: int, epochs: int, env: dict, timeout: int) -> str:
    """The same small sweep at sweep.gpus_per_trial=0.25 and =1 (on the CPU: Ray's default CPU packing only)."""
    settings = {"0.25 GPU per trial": ["sweep.gpus_per_trial=0.25"], "1 GPU per trial": ["sweep.gpus_per_trial=1"]} \
        if device != "cpu" else {"1 CPU per trial (dry run)": []}
    rows = ["| trials per GPU | trials | epochs | wall s | GPU utilisation |", "|---|---|---|---|---|"]
    for name, extra in settings.items():
        out = tempfile.mkdtemp(prefix="gpu-check-sweep-")
        sampler = GpuSampler()
        began = time.perf_counter()
        proc = subprocess.run([PYTHON, "-m", "blendtune.cli", "sweep", "experiments/synthetic_naive.yaml", "--space",
                               "search_spaces/balancing_knobs.yaml", f"sweep.num_samples={trials}", "sweep.search=random",
                               "sweep.scheduler=none", f"train.epochs={epochs}", "data.synthetic.num_train=2000",
                               f"train.device={device}", "wandb=false", "train.progress=false", f"output_dir={out}", *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - began
        use = sampler.stop()
        shutil.rmtree(out, ignore_errors=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        rows.append(f"| {name} | {trials} | {epochs} | {wall:.1f} | {use} |")
    return "\n".join(rows)


def run_part(title: str, command: list[str], timeout: int, device: str, env: dict, results: Path) -> tuple[str, str]:
    """(status, markdown) of one part; the benchmark scripts write their tables into `results`."""
    before = set(results.glob("*.md"))
    began = time.perf_counter()
    try:
        if command[0] == "sweep":
            body = sweep_packing(device, int(command[1]), int(command[2]), env, timeout)
        else:
            proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            if proc.returncode != 0:
                return f"failed (exit {proc.returncode}, {time.perf_counter() - began:.0f} s)", f"```\n{tail}\n```"
            tables = [p.read_text() for p in sorted(set(results.glob("*.md")) - before)]
            body = "\n".join(t.split("\n", 2)[-1] for t in tables) if tables else f"```\n{tail}\n```"
    except subprocess.TimeoutExpired:
        return f"ran out of its {timeout} s", ""
    except Exception as e:  # one part failing must not cost the others their minutes
        return f"failed ({type(e).__name__})", f"```\n{e}\n```"
    return f"ok ({time.perf_counter() - began:.0f} s)", body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default="gpu-check.md")
    args = parser.parse_args()
    results = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = {**os.environ, "BLENDTUNE_BENCH_RESULTS": str(results), "BLENDTUNE_TEST_DEVICE": args.device,
           "WANDB_MODE": "offline"}
    began = time.perf_counter()
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    sections = [f"# blendtune GPU check ({args.device})", "",
                f"torch {torch.__version__}, {gpu}; started {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
                "| part | status |", "|---|---|"]
    bodies = []
    for title, command, timeout in parts(args.device):
        status, body = run_part(title, command, timeout, args.device, env, results)
        print(f"gpu-check: {title}: {status}", flush=True)
        sections.append(f"| {title} | {status} |")
        bodies += ["", f"## {title}", "", body]
    sections += bodies + ["", f"Whole check: {time.perf_counter() - began:.0f} s."]
    Path(args.out).write_text("\n".join(sections) + "\n")
    shutil.rmtree(results, ignore_errors=True)
    print(Path(args.out).resolve())


if __name__ == "__main__":
    main()

"""Where each epoch's metrics go: `metrics.jsonl` in the run directory, a compact table on stdout, and
Weights & Biases (one run per training run / sweep trial, `epoch` as the step, grouped by sweep).

W&B is offline by default (no key needed; `wandb sync DIR` uploads later). Set WANDB_MODE=online (or
log in with a key) to stream. `wandb=false` in the config turns it off.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from blendtune.evaluation import score_name


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/nan; null marks "undefined" (e.g. OGR when dG == 0)
    return value


class MetricsFile:
    """Appends one JSON object per epoch. Opening it drops the epochs after `from_epoch`, the epoch
    training goes on from (a resumed checkpoint's, or 0 for a fresh start in a reused directory), and a
    torn last line (a write cut off by a kill: `records`)."""

    def __init__(self, path: Path, from_epoch: int = 0):
        self.path = path
        if path.exists():
            kept = [line for line, row in self.records(path) if row["epoch"] <= from_epoch] if from_epoch > 0 else []
            # Replaced at once: a kill during this rewrite leaves the old file, not a truncated one (the
            # next opening overwrites a `.metrics.jsonl.tmp` such a kill leaves).
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise self._cannot_write(e) from None

    def __call__(self, metrics: dict) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps({k: _json_safe(v) for k, v in metrics.items()}) + "\n")
        except OSError as e:  # a full disk: one line naming the file (a torn line it may leave is dropped on resume)
            raise self._cannot_write(e) from None

    def _cannot_write(self, e: OSError):
        from blendtune.errors import UserError
        return UserError(f"cannot write '{self.path}': {e.strerror or e}; free some space, then resume the run "
                         "(blendtune train --resume RUN_DIR)")

    @staticmethod
    def records(path: Path, quiet: bool = False) -> list[tuple[str, dict]]:
        """(line, parsed row) of each epoch in a metrics.jsonl. A last line that does not parse is a write
        cut off (a kill, a full disk, a node lost mid-append): dropped, and said once on stderr. A line
        before it that does not parse is damage no blendtune write makes: a UserError naming the line."""
        from blendtune.errors import UserError

        path = Path(path)
        lines = [(n, line) for n, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(),
                                                   start=1) if line.strip()]
        records = []
        for i, (n, line) in enumerate(lines):
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                    raise ValueError("not an object with an integer 'epoch'")
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                if i == len(lines) - 1:
                    if not quiet:
                        print(f"blendtune: {path.name}: dropped a torn last line (a write cut off)", file=sys.stderr,
                              flush=True)
                    break
                raise UserError(f"'{path}' line {n} is not an epoch's metrics ({str(e).splitlines()[0]}): the file "
                                "is damaged before its last line; fix or delete that line and retry") from None
            records.append((line, row))
        return records


def read_metrics(path: Path) -> list[dict]:
    """The epochs of a metrics.jsonl, without a torn last line (`MetricsFile.records`)."""
    return [row for _, row in MetricsFile.records(path)]


class EpochTable:
    """epoch | test accuracy (mAP when multi-label) per head | blend weights or OGM coefficients | seconds."""

    def __init__(self, heads: list[str], stream=None):
        self.heads = heads
        self._stream = stream  # None: sys.stdout as it is when printing (a notebook's or pytest's may change)
        self.printed_header = False

    @property
    def stream(self):
        return self._stream or sys.stdout

    def __call__(self, metrics: dict) -> None:
        extra = sorted(k for k in metrics if k.startswith(("gblend/w/", "ogm/coeff/")))
        cols = ["epoch"] + [f"test/{h}" for h in self.heads + ["ensemble"]] + \
               [k.replace("gblend/w/", "w:").replace("ogm/coeff/", "k:") for k in extra] + ["sec"]
        if not self.printed_header:
            print("  ".join(f"{c:>10}" for c in cols), file=self.stream)
            self.printed_header = True
        values = [f"{metrics['epoch']:>10d}"]
        score = score_name(metrics)
        tests = [metrics.get(f"{score}/test/{h}") for h in self.heads + ["ensemble"]]  # none: train.test_every
        values += [f"{'-':>10}" if t is None else f"{t:>10.4f}" for t in tests]
        values += [f"{metrics[k]:>10.3f}" for k in extra]
        values.append(f"{metrics.get('time/epoch_s', 0.0):>10.1f}")
        print("  ".join(values), file=self.stream, flush=True)


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_online_without_key() -> bool:
    """WANDB_MODE=online with no key W&B could use (WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc):
    every run would stop in wandb.init, a sweep's trials each with a traceback."""
    if wandb_mode() != "online" or os.environ.get("WANDB_API_KEY"):
        return False
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(os.environ.get("NETRC", netrc)) as f:
            return "api.wandb.ai" not in f.read()
    except OSError:
        return True


def wandb_unreachable(timeout_s: float = 5.0) -> str | None:
    """WANDB_MODE=online: why W&B's server cannot be reached (a TCP connection to WANDB_BASE_URL, default
    https://api.wandb.ai, within `timeout_s`), or None. Without this check wandb.init retries for ~90 s and
    ends in a traceback."""
    if wandb_mode() != "online":
        return None
    import socket
    from urllib.parse import urlparse
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    parsed = urlparse(url if "://" in url else f"https://{url}")
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=timeout_s).close()
        return None
    except OSError as e:
        return f"{url} cannot be reached ({e.strerror or e})"


def _start_in_a_second_of_its_own(wandb_dir: Path, run_id: str) -> None:
    """W&B names a session's folder by its start second and the run id (`offline-run-YYYYmmdd_HHMMSS-<id>`):
    a resumed session starting within the second the previous one started would reuse that folder and
    overwrite its history. Wait (under a second) until the current second names no such folder."""
    import time
    while any((wandb_dir / f"{kind}-run-{time.strftime('%Y%m%d_%H%M%S', clock(time.time()))}-{run_id}").exists()
              for kind in ("offline", "run") for clock in (time.localtime, time.gmtime)):
        time.sleep(0.05)


class WandbLogger:
    """One W&B run; `epoch` is the step. With `wait_until_on_disk` (a sweep trial, whose files are copied to
    storage right after each epoch), each call returns once W&B has written the epoch to the run's file:
    what is copied then has every epoch, even if the scheduler stops the trial, or its node dies, next."""

    def __init__(self, directory: Path, config: dict, run_id: str, name: str, project: str,
                 group: str | None = None, entity: str | None = None, wait_until_on_disk: bool = False):
        import wandb  # imported here: runs without W&B never pay for it

        from blendtune.wandb_files import HistoryReader

        directory.mkdir(parents=True, exist_ok=True)
        _start_in_a_second_of_its_own(directory / "wandb", run_id)
        self.run = wandb.init(project=project, entity=entity, group=group, name=name, id=run_id, config=config,
                              dir=str(directory), mode=wandb_mode(), resume="allow", reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                                      # on disk within a fraction of a second, not 15 s
                                                      x_transaction_log_flush_interval=0.2))
        writes_file = wandb_mode() != "disabled" and self.run.settings.sync_file  # disabled: no file ever comes
        self.sync_file = self.run.settings.sync_file if writes_file else None
        self.on_disk = HistoryReader(self.sync_file) if wait_until_on_disk and writes_file else None
        self.last_step: int | None = None

    def __call__(self, metrics: dict) -> None:
        step = int(metrics["epoch"])
        # commit: with an explicit step W&B holds the row back until a later step arrives, so a trial
        # stopped by the scheduler (or killed) would lose its last epoch
        self.run.log({k: v for k, v in metrics.items() if k != "epoch"}, step=step, commit=True)
        self.last_step = step
        if self.on_disk is not None:
            self._wait_for(step, self.on_disk)

    @staticmethod
    def _wait_for(step: int, reader, timeout: float = 10.0) -> None:
        """W&B writes the row from its own process within the flush interval; at most `timeout` s."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(row.get("_step") == step for row in reader.new_rows()):
                return
            time.sleep(0.02)

    def close(self) -> None:
        self.run.finish()
        # finish() can return before W&B's own process has written the last rows of an offline run: a run
        # read (or synced, or copied to storage) right after the run returns would miss its last epochs
        if self.sync_file and self.last_step is not None and self.on_disk is None:
            from blendtune.wandb_files import HistoryReader
            self._wait_for(self.last_step, HistoryReader(self.sync_file))


def close_loggers(loggers) -> None:
    for logger in loggers:
        if hasattr(logger, "close"):
            logger.close()



def flat_dict(nested: dict) -> dict:
    """{'optim': {'lr': 0.01}} -> {'optim.lr': 0.01}: the dotted keys overrides, spaces and W&B use."""
    out: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node
    walk("", nested)
    return out

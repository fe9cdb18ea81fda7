"""Reads the history of an offline W&B run (`wandb/offline-run-*/run-*.wandb`) without uploading it.

The file is W&B's record log: a 7-byte header, then LevelDB-style 32 KiB blocks of chunks (7-byte
chunk header: crc32c, length, type FULL/FIRST/MIDDLE/LAST) holding protobuf `Record`s.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


HEADER = 7  # ":W&B" + magic + version


def _records(data: bytes, base: int):
    """(record bytes, file offset just past it) of each complete record in `data`, the file's bytes from
    offset `base` (the start of a record, or HEADER). A record cut off at the end is not yielded."""
    pos, pending = 0, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - ((base + pos) % BLOCK)
        if left_in_block < 7:  # trailer padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # being written
            return
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk, base + pos
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk, base + pos
            pending = b""
        elif length == 0:
            pos += left_in_block - 7  # zero padding to the block end


class HistoryReader:
    """Reads an offline run's history as it grows: each call parses only the records added since the last
    (a run of many epochs is polled every epoch; reparsing it all would grow with every epoch)."""

    def __init__(self, run_file: str | Path):
        self.run_file = Path(run_file)
        self.offset = HEADER
        self.torn = False

    def new_rows(self) -> list[dict]:
        """One dict per `wandb.log` call since the last call, with `_step`."""
        from wandb.proto import wandb_internal_pb2

        if self.torn or not self.run_file.is_file():
            return []
        with self.run_file.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        rows = []
        for raw, end in _records(data, self.offset):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(raw)
            except Exception:  # a torn last record: the process writing it was killed
                self.torn = True
                break
            self.offset = end
            if record.WhichOneof("record_type") == "history":
                rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                             for item in record.history.item})
        return rows


def read_history(run_file: str | Path) -> list[dict]:
    """One dict per `wandb.log` call, with `_step`."""
    return HistoryReader(run_file).new_rows()


def logged_steps(log_dir: str | Path) -> set[int]:
    """The steps every offline W&B session under `log_dir/wandb` has on disk. W&B flushes its file only
    every few seconds and when the run finishes, so a session killed with its node lacks its last epochs."""
    steps: set[int] = set()
    for run_file in Path(log_dir).glob("wandb/offline-run-*/run-*.wandb"):
        steps |= {int(row["_step"]) for row in read_history(run_file) if "_step" in row}
    return steps

"""Where a sweep's files live: a local or shared (NFS) directory, or an object store (`s3://bucket/prefix`,
`gs://...`), read and written through pyarrow's filesystem layer, which is what Ray Tune and Train use
for the same storage path. Credentials and endpoint come from the usual environment (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for MinIO and friends).

    check_writable(uri, "sweep.storage_path")      # before a sweep starts: one line if it cannot be used
    write_text(join(uri, "sweep.json"), text)      # atomic: a reader sees the old file or the new one
    TrialFiles(remote_dir).pull() / .push()        # a trial's metrics and W&B files, kept on storage

A trial writes its files to a local scratch folder and pushes them to storage after every epoch: Ray
reuses a worker process for the next trial (and only moves the working directory of the first one),
Train V2 workers sync no artifacts at all, and a node that dies takes its local folders with it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from blendtune.errors import SettingError


def is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`s3://b/p` + `tune` -> `s3://b/p/tune`, options kept (`s3://b/p/tune?allow_delayed_open=true`); a
    local path stays a local path (never through Path(), which would turn `s3://` into `s3:/`)."""
    base = str(base)
    if not is_url(base):
        return str(Path(base, *parts))
    head, question, options = base.partition("?")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + question + options


def with_single_put_writes(uri: str) -> str:
    """An s3:// URL with pyarrow's `allow_delayed_open=true`: a small file is then one PUT instead of a
    three-request multipart upload, for Ray's uploads (it opens the storage path with the same URL) and
    ours. The cost pyarrow names, an error seen only when the file is closed, does not apply: every
    write here is closed at once, and the storage is checked before a sweep starts."""
    if not uri.startswith("s3://") or "allow_delayed_open" in uri:
        return uri
    return uri + ("&" if "?" in uri else "?") + "allow_delayed_open=true"


def absolute(path: str | os.PathLike) -> str:
    """A URL as given; a local path made absolute (symlinks kept: a shared mount stays as named)."""
    return str(path) if is_url(path) else os.path.abspath(os.path.expanduser(str(path)))


def filesystem(uri: str | os.PathLike):
    """(pyarrow FileSystem, path on it) for a URL or a local path."""
    import pyarrow.fs as pafs
    if is_url(uri):
        return pafs.FileSystem.from_uri(str(uri))
    return pafs.LocalFileSystem(), absolute(uri)


def is_dir(uri: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_text(uri: str | os.PathLike) -> str | None:
    """The file's text, or None if there is none."""
    import pyarrow.fs as pafs
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str | os.PathLike, text: str) -> None:
    fs, path = filesystem(uri)
    _replace(fs, path, text.encode(), local=not is_url(uri))


def _replace(fs, path: str, data: bytes, local: bool) -> None:
    """Replace the file at once: locally through a temporary file and a rename; an object store's PUT is
    atomic already (and has no folders to make: each request costs)."""
    if not local:
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{name}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def delete(uri: str | os.PathLike) -> None:
    fs, path = filesystem(uri)
    fs.delete_file(path)


def _entries(uri: str | os.PathLike):
    import pyarrow.fs as pafs
    fs, path = filesystem(uri)
    return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))


def list_names(uri: str | os.PathLike) -> list[str]:
    """Names directly inside a directory (empty if it does not exist)."""
    return sorted(info.base_name for info in _entries(uri))


def list_files(uri: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """{name: (mtime in ns, size)} of the files directly inside a directory (empty if there is none)."""
    import pyarrow.fs as pafs
    return {i.base_name: (i.mtime_ns or 0, i.size or 0) for i in _entries(uri) if i.type == pafs.FileType.File}


def check_writable(uri: str, key: str) -> None:
    """Write and delete a marker under `uri`, before anything else is created: an unreachable endpoint,
    a bucket that does not exist, missing or wrong credentials become one line naming `key`."""
    marker = join(uri, f".blendtune-write-check-{secrets.token_hex(4)}")
    try:
        write_text(marker, "blendtune checks that it can write here\n")
        delete(marker)
    except (OSError, ValueError) as e:  # pyarrow raises OSError for S3/HTTP errors, ValueError for bad URLs
        reason = " ".join(str(e).split())
        raise SettingError(key, f"cannot write to {uri!r}: {reason[:300]}") from None


class TrialFiles:
    """A run's files (metrics.jsonl, W&B offline runs) written in a local scratch folder and kept in
    `remote` (a directory on the sweep's storage): `pull()` brings back what an earlier attempt of the
    same trial left there (a retried or resumed trial, on this node or another), `push()` uploads what
    changed since the last push, `close()` pushes and removes the scratch folder."""

    def __init__(self, remote: str, prefix: str = "blendtune-trial-"):
        self.remote = remote
        self._fs, self._path = filesystem(remote)  # once: an s3:// URL without a region costs a request
        self.local = Path(tempfile.mkdtemp(prefix=prefix))
        self._pushed: dict[str, tuple[int, int]] = {}
        self.seconds = 0.0  # spent copying to and from storage (reported to Tune as time/trial_files_s)

    def pull(self) -> None:
        with self._timed():
            self._pull()

    def push(self) -> None:
        with self._timed():
            self._push()

    @contextlib.contextmanager
    def _timed(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - began

    def _pull(self) -> None:
        import pyarrow.fs as pafs
        fs, path = self._fs, self._path
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            relative = info.path[len(path):].lstrip("/")
            if info.type != pafs.FileType.File or not self._is_ours(relative):
                continue
            target = self.local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            stat = target.stat()
            self._pushed[relative] = (stat.st_mtime_ns, stat.st_size)

    @staticmethod
    def _is_ours(relative: str) -> bool:
        # Tune and Train write their own files into the same trial directory: leave them alone
        top = relative.split("/", 1)[0]
        return top in ("metrics.jsonl", "wandb", "diverged.txt") and not TrialFiles._is_debug_log(relative)

    @staticmethod
    def _is_debug_log(relative: str) -> bool:
        # W&B's own debug logs grow with every epoch and `wandb sync` does not need them
        return relative.startswith("wandb/") and "/logs/" in relative

    def _push(self) -> None:
        for file in self._files():
            relative = file.relative_to(self.local).as_posix()
            stat = file.stat()
            signature = (stat.st_mtime_ns, stat.st_size)
            if self._is_debug_log(relative) or self._pushed.get(relative) == signature:
                continue
            _replace(self._fs, f"{self._path}/{relative}", file.read_bytes(), local=not is_url(self.remote))
            self._pushed[relative] = signature

    def _files(self) -> list[Path]:
        """Regular files only: W&B adds symlinks (latest-run, debug.log) to what it also writes."""
        found = []
        for folder, _, names in os.walk(self.local):
            found += [Path(folder, n) for n in names if not os.path.islink(os.path.join(folder, n))]
        return sorted(found)

    def close(self) -> None:
        try:
            self.push()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)

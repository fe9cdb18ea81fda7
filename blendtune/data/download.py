"""`blendtune data download fsdd`: the Free Spoken Digit Dataset at a pinned commit, verified file by
file against the SHA-256 manifest shipped in the package. Everything is fetched and checked in a temporary
folder beside the target and moved into place in one rename: a failed download leaves nothing behind."""
from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath

from blendtune.errors import UserError

FSDD_COMMIT = "26eb9aaf76e81b692f806f9140c2d2777410d7a1"
FSDD_URL = f"https://github.com/Jakobovski/free-spoken-digit-dataset/archive/{FSDD_COMMIT}.tar.gz"
FSDD_MANIFEST = Path(__file__).with_name("fsdd.sha256")


def read_manifest(path: Path = FSDD_MANIFEST) -> dict[str, str]:
    """{'recordings/0_george_0.wav': sha256, ...}"""
    entries = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            entries[name.strip()] = digest
    return entries


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(folder: Path, manifest: dict[str, str]) -> list[str]:
    """What differs from the manifest under `folder` (the parent of recordings/): missing or changed files."""
    problems = []
    for name, digest in manifest.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"missing {name}")
        elif sha256(path) != digest:
            problems.append(f"checksum mismatch {name}")
    return problems


def fetch(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, out, 1 << 20)
    except Exception as e:
        raise UserError(f"download of {url} failed: {e}") from None
    got = dest.stat().st_size
    if expected is not None and got != int(expected):
        raise UserError(f"download of {url} is truncated: {got} of {expected} bytes")


def extract_recordings(archive: Path, dest: Path, manifest: dict[str, str]) -> None:
    """Unpack the archive's `<top>/recordings/*` members listed in the manifest into dest/recordings."""
    wanted = set(manifest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                name = "/".join(parts[1:])  # drop the archive's top folder (<repo>-<commit>/)
                if name in wanted and member.isfile():
                    target = dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"archive '{archive.name}' is damaged or truncated: {e}") from None


def download_fsdd(root: Path, url: str = FSDD_URL, log=print) -> Path:
    """Fetch, unpack and verify FSDD into <root>/fsdd/recordings; returns that folder."""
    manifest = read_manifest()
    target = root / "fsdd"
    if (target / "recordings").exists():
        problems = verify(target, manifest)
        if problems:
            raise UserError(f"'{target / 'recordings'}' exists but does not match the manifest "
                            f"({len(problems)} problems, first: {problems[0]}); move it away and download again")
        log(f"FSDD already present and verified ({len(manifest)} files): {target / 'recordings'}")
        return target / "recordings"
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".fsdd-download-", dir=target) as tmp:
            tmp = Path(tmp)
            log(f"downloading {url}")
            fetch(url, tmp / "archive.tar.gz")
            extract_recordings(tmp / "archive.tar.gz", tmp / "tree", manifest)
            problems = verify(tmp / "tree", manifest)
            if problems:
                raise UserError(f"the downloaded FSDD does not match the manifest ({len(problems)} problems, "
                                f"first: {problems[0]}); nothing was written to '{target}'")
            (tmp / "tree" / "recordings").rename(target / "recordings")
    except BaseException:
        if created and not any(target.iterdir()):
            target.rmdir()
        raise
    log(f"verified {len(manifest)} files against the SHA-256 manifest: {target / 'recordings'}")
    return target / "recordings"

"""`blendtune data download fsdd` against a local HTTP server: success, a corrupted member, truncated downloads."""
import http.server
import io
import tarfile
import threading

import pytest

from blendtune.data.download import FSDD_COMMIT, read_manifest
from conftest import SHARED_DATA, cli_in_process, needs_data

pytestmark = needs_data
TOP = f"free-spoken-digit-dataset-{FSDD_COMMIT}"


def archive(corrupt: str | None = None) -> bytes:
    """A GitHub-style archive (<repo>-<commit>/recordings/...) built from the shared copy."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        tar.add(SHARED_DATA / "fsdd" / "recordings", arcname=f"{TOP}/recordings", recursive=False)
        for path in sorted((SHARED_DATA / "fsdd" / "recordings").iterdir()):
            data = path.read_bytes()
            if path.name == corrupt:
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            info = tarfile.TarInfo(f"{TOP}/recordings/{path.name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        readme = b"readme"
        info = tarfile.TarInfo(f"{TOP}/README.md")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    files = {}
    good = archive()
    files["/good.tar.gz"] = (good, len(good))
    bad = archive(corrupt="3_theo_7.wav")
    files["/corrupt.tar.gz"] = (bad, len(bad))
    files["/truncated.tar.gz"] = (good[: len(good) // 2], len(good) // 2)   # server says the short length
    files["/cut.tar.gz"] = (good[: len(good) // 2], len(good))              # connection drops mid-body

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in files:
                self.send_error(404)
                return
            body, length = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def download(capsys):
    """`blendtune data download fsdd --root ROOT --url URL`, in this process (cli.main)."""
    return lambda root, url: cli_in_process(capsys, "data", "download", "fsdd", "--root", root, "--url", url)


def test_manifest_covers_the_shared_copy():
    manifest = read_manifest()
    assert len(manifest) == 3000 and all(name.startswith("recordings/") for name in manifest)


def test_download_unpacks_and_verifies(server, tmp_path, download):
    proc = download(tmp_path, f"{server}/good.tar.gz")
    assert proc.returncode == 0, proc.stderr
    assert "verified 3000 files" in proc.stdout
    recordings = tmp_path / "fsdd" / "recordings"
    assert len(list(recordings.glob("*.wav"))) == 3000
    assert [p.name for p in (tmp_path / "fsdd").iterdir()] == ["recordings"]  # no temp folder left
    again = download(tmp_path, f"{server}/good.tar.gz")  # present: verified, not fetched again
    assert again.returncode == 0 and "already present and verified" in again.stdout


@pytest.mark.parametrize("name, message", [
    ("corrupt.tar.gz", "checksum mismatch recordings/3_theo_7.wav"),
    ("truncated.tar.gz", "damaged or truncated"),
    ("cut.tar.gz", "download of"),
])
def test_a_bad_download_leaves_nothing_behind(server, tmp_path, name, message, download):
    proc = download(tmp_path, f"{server}/{name}")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("BLENDTUNE_DATA_ROOT", str(SHARED_DATA))
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class CliRun:
    """What `blendtune ...` gave: its exit code and what it printed (the fields of subprocess's result)."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def __repr__(self):
        return f"CliRun(returncode={self.returncode}, stderr={self.stderr[-2000:]!r})"


def _open_run_locks() -> set[str] | None:
    """The run-folder lock files (blendtune.runs.LOCK_FILE) this process has open; None where /proc cannot say."""
    from blendtune.runs import LOCK_FILE
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    targets = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            targets.add(os.readlink(f"/proc/self/fd/{fd}"))
    return {t for t in targets if t.endswith(f"/{LOCK_FILE}")}


def cli_in_process(capture, *args, env: dict | None = None, cwd=REPO) -> CliRun:
    """`blendtune ARGS` in this process through `blendtune.cli.main`, as `python -m blendtune.cli` would run it
    from `cwd` with `env` added to the environment (a value of None removes the variable), without paying a
    Python + torch start per call. `capture` is pytest's `capsys`, or `capfd` where DataLoader worker processes
    or C code print too (a subprocess's pipes saw both). Environment, working directory and the CLI's record of
    the run in progress are put back afterwards: the next call starts as a fresh process would."""
    from blendtune import cli
    capture.readouterr()  # only this command's output
    locks = _open_run_locks()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        for key, value in (env or {}).items():
            if value is None:
                mp.delenv(key, raising=False)
            else:
                mp.setenv(key, str(value))
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors exit as the process would
            code = e.code if isinstance(e.code, int) else 1
        finally:
            cli._RUNNING.clear()
            # a run folder's lock is an open file, closed when the last reference goes (the process's exit, in
            # a subprocess): were one still open, reference cycles would hold it, and a resume meet "is in use"
            now = _open_run_locks()
            if now is None or now - locks:
                import gc
                gc.collect()
    out = capture.readouterr()
    return CliRun(code, out.out, out.err)


def has_shared_data() -> bool:
    root = Path(os.environ["BLENDTUNE_DATA_ROOT"])
    return (root / "fsdd" / "recordings").is_dir() and (root / "mnist" / "mnist5k.npz").is_file()


needs_data = pytest.mark.skipif(not has_shared_data(), reason="shared FSDD/MNIST data not found (BLENDTUNE_DATA_ROOT)")

# A tiny synthetic setting every fast test builds on: seconds per run on 2 CPU cores.
TINY = ["data.dataset=synthetic", "data.synthetic.num_train=200", "data.synthetic.num_test=100",
        "data.held_out_ratio=0.2", "data.batch_size=32", "train.epochs=2", "train.progress=false",
        "data.synthetic.modalities.memorizable.memorize_dims=64", "wandb=false"]
# BLENDTUNE_TEST_DEVICE=cuda (benchmarks/gpu_check.py): every test built on TINY trains on that device
if os.environ.get("BLENDTUNE_TEST_DEVICE"):
    TINY = TINY + [f"train.device={os.environ['BLENDTUNE_TEST_DEVICE']}"]


def make_tiny_avdigits(root, broken: str | None = None):
    """FSDD-layout clips of 2 digits x 3 speakers x 2 takes and a 40-image MNIST npz."""
    rec = root / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for digit in range(2):
        for speaker in ("ann", "bob", "cid"):
            for take in range(2):
                path = rec / f"{digit}_{speaker}_{take}.wav"
                soundfile.write(path, rng.normal(0, 0.1, 4000 + 1000 * digit).astype(np.float32), 8000)
    if broken:
        (rec / broken).write_bytes(b"RIFF\x00\x00not really a wav")
    (root / "mnist").mkdir()
    np.savez(root / "mnist" / "mnist5k.npz", images=rng.uniform(0, 255, (40, 28, 28)).astype(np.float32),
             labels=np.repeat(np.arange(2), 20))


# ---- tiny datasets in each on-disk layout (issue 4) --------------------------------------------------
def write_wav(path, seconds: float, rate: int, freq: float, seed: int = 0):
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.05, len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, (0.5 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32), rate)


def write_frames(folder, count: int, colour: int, size=(24, 32), seed: int = 0):
    from torchvision.io import encode_jpeg, write_file
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        img = (torch.full((3, *size), colour, dtype=torch.int32) + torch.randint(-20, 20, (3, *size), generator=gen))
        write_file(str(folder / f"{i:03d}.jpg"), encode_jpeg(img.clamp(0, 255).to(torch.uint8)))


EMOTIONS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


def make_crema_d(root, per_class: int = 2, actors=("1001", "1002", "1003")):
    """OGM-GE's CREMA-D layout: AudioWAV/<clip>.wav, Image-01-FPS/<clip>/*.jpg, train.csv/test.csv."""
    rows = {"train": [], "test": []}
    for c, emotion in enumerate(EMOTIONS):
        for actor in actors:
            for take in range(per_class):
                clip = f"{actor}_T{take}_{emotion}_XX"
                write_wav(root / "AudioWAV" / f"{clip}.wav", 0.3 + 0.1 * take, 16000, 200 + 100 * c, seed=c)
                write_frames(root / "Image-01-FPS" / clip, 2, 40 * c, seed=take)
                rows["test" if actor == actors[-1] else "train"].append(f"{clip},{emotion}")
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


CREMA_TINY = ["data.dataset=crema_d", "data.crema_d.sample_rate=8000", "data.crema_d.window_s=0.5",
              "data.crema_d.n_fft=128", "data.crema_d.hop_length=64", "data.crema_d.image_size=32",
              "data.crema_d.num_frames=2", "model.encoders.audio.name=spec_cnn", "model.encoders.audio.hidden=8",
              "model.encoders.visual.name=spec_cnn", "model.encoders.visual.hidden=8",
              "data.batch_size=8", "data.eval_batch_size=16", "train.epochs=1", "train.progress=false",
              "wandb=false", "data.held_out_ratio=0.2"]


def make_av_csv(root, multilabel: bool = False):
    """Kinetics-Sounds / VGGSound style: data.csv (id,label,split,group), audio/<id>.wav, frames/<id>/*.jpg."""
    labels = ["dog", "drum", "rain"]
    lines = ["id,label,split,group"]
    for i in range(18):
        c = i % 3
        label = f"{labels[c]};{labels[(c + 1) % 3]}" if multilabel and i % 2 else labels[c]
        clip = f"clip{i:02d}"
        write_wav(root / "audio" / f"{clip}.wav", 0.4, 16000, 300 + 200 * c, seed=i)
        write_frames(root / "frames" / clip, 3, 60 * c, seed=i)
        lines.append(f"{clip},{label},{'test' if i >= 12 else 'train'},v{i // 4}")
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return root


AV_CSV_TINY = ["data.dataset=av_csv", "data.av_csv.sample_rate=8000", "data.av_csv.window_s=0.5",
               "data.av_csv.n_fft=128", "data.av_csv.hop_length=64", "data.av_csv.image_size=32",
               "data.av_csv.num_frames=2", "model.encoders.audio.name=spec_cnn", "model.encoders.audio.hidden=8",
               "model.encoders.visual.name=spec_cnn", "model.encoders.visual.hidden=8",
               "data.batch_size=4", "train.epochs=1", "train.progress=false", "wandb=false", "data.held_out_ratio=0.2"]


def make_features(root, n_train: int = 120, n_test: int = 60, multilabel: bool = False):
    """train/ and test/ with a vector modality, a sequence modality and labels."""
    rng = np.random.default_rng(0)
    prototypes = rng.normal(0, 1, (4, 8))
    for split, n in (("train", n_train), ("test", n_test)):
        folder = root / split
        folder.mkdir(parents=True)
        y = rng.integers(0, 4, n)
        np.save(folder / "vec.npy", (prototypes[y] + rng.normal(0, 0.3, (n, 8))).astype(np.float32))
        np.savez(folder / "seq.npz", features=rng.normal(0, 1, (n, 5, 6)).astype(np.float32))
        np.save(folder / "labels.npy", np.eye(4)[y] if multilabel else y)
    return root


# ---- W&B offline runs against metrics.jsonl --------------------------------------------------------
WANDB_OWN_KEYS = {"_step", "_timestamp", "_runtime"}


class SharedTrunk(torch.nn.Module):
    """A user's backbone whose one layer serves both modalities (a step on one changes the other's features):
    what the strategies that need one model per modality (MLA, UME, UMT) refuse, naming the layer."""
    feature_dims = {"a": 8, "b": 8}

    def __init__(self):
        super().__init__()
        self.a, self.b, self.trunk = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)

    def forward(self, inputs):
        return {"a": self.trunk(self.a(inputs["a"])), "b": self.trunk(self.b(inputs["b"]))}

    @staticmethod
    def data(n: int = 16) -> list:
        return [({"a": torch.randn(4), "b": torch.randn(4)}, i % 2) for i in range(n)]


def gradients_at_step(trainer, batch) -> dict:
    """Run the loop's own step on one batch; the gradients the optimizer received."""
    seen = {}
    step = trainer.optimizer.step

    def capture(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)
    trainer.optimizer.step = capture
    try:
        trainer.train_steps(trainer.train_model, [batch], trainer.optimizer, trainer.scaler, trainer.strategy, 1, True)
    finally:
        trainer.optimizer.step = step
    return seen


def wandb_history(run_dir) -> list[dict]:
    """Every row W&B recorded for a run or trial directory, over all its offline sessions in the order
    they ran (a resume opens a new `offline-run-*` folder)."""
    from blendtune.wandb_files import read_history
    sessions = [h for h in (read_history(f) for f in Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")) if h]
    return [row for h in sorted(sessions, key=lambda h: h[0]["_timestamp"]) for row in h]


def assert_wandb_matches_metrics(history: list[dict], rows: list[dict]) -> None:
    """W&B has each epoch once, as its step, with exactly the keys and values of metrics.jsonl
    (which writes null where a value is inf/NaN)."""
    import math
    assert [h["_step"] for h in history] == [r["epoch"] for r in rows]
    for h, r in zip(history, rows):
        assert set(h) - WANDB_OWN_KEYS == set(r) - {"epoch"}, (set(h) ^ set(r)) - WANDB_OWN_KEYS - {"epoch"}
        for key, value in r.items():
            if key == "epoch":
                continue
            if value is None:
                assert not math.isfinite(h[key]), (r["epoch"], key, h[key])
            else:
                assert h[key] == pytest.approx(value, rel=1e-12, abs=1e-300), (r["epoch"], key, h[key], value)


# ---- a real S3 API server on localhost (moto's standalone server, as Ray's own tests use) ------------
@contextlib.contextmanager
def s3_server_process(check_credentials: bool = False):
    """Starts `moto_server` on a free loopback port and points the AWS environment at it (pyarrow and
    Ray read AWS_ENDPOINT_URL and the keys from there; Ray processes started later inherit them).
    With `check_credentials`, the server accepts only keys it issued (one unauthenticated call is left
    for making a bucket). Yields a function that makes a fresh bucket and returns its s3:// URL."""
    import secrets
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "1"} if check_credentials else {})}
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=server_env)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "blendtune-test",
           "AWS_SECRET_ACCESS_KEY": "blendtune-test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.1)
        import boto3
        client = boto3.client("s3")

        def bucket(prefix: str = "sweeps") -> str:
            name = f"blendtune-{secrets.token_hex(4)}"
            client.create_bucket(Bucket=name)
            return f"s3://{name}/{prefix}"
        yield bucket
    finally:
        server.kill()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server():
    with s3_server_process() as bucket:
        yield bucket

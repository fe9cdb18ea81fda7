"""Bad inputs, round two (issue 26): each is one line naming the file, item or key, exit 2, before a run
folder is made — or, where nothing is wrong but something is worth knowing, a note. The CLI runs in this
process (`cli.main`), as a user's shell would run it, without paying a torch import per case."""
from __future__ import annotations

import os
import numpy as np
import pytest
import torch
from torch import nn

import blendtune
from blendtune.errors import UserError
from conftest import CREMA_TINY, REPO, TINY, cli_in_process, make_av_csv, make_crema_d, make_features

FEATURES_TINY = [REPO / "experiments" / "features_gblend.yaml", "strategy=naive", "data.batch_size=16", "train.epochs=1",
                 "train.progress=false", "wandb=false"]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    run = cli_in_process(capsys, *args)
    return run.returncode, run.stdout, run.stderr


def _labels(root, split, values):
    np.save(root / split / "labels.npy", np.asarray(values))
    n = len(values)
    for name in ("vec", "seq"):  # keep the rows matching the labels
        path = root / split / (f"{name}.npy" if name == "vec" else f"{name}.npz")
        x = np.load(path) if name == "vec" else np.load(path)["features"]
        x = np.resize(x, (n, *x.shape[1:]))
        np.save(path, x) if name == "vec" else np.savez(path, features=x)


FEATURE_LABEL_CASES = {
    # name: (train labels, test labels, what data check and training say)
    "label -1": ([0, 1, 2, 3] * 10, [0, 1, -1, 3] * 5, "label outside the classes"),
    "a float label 1.5": ([0, 1.5, 2, 3] * 10, [0, 1, 2, 3] * 5, "not a class index"),
    "a class only in test": ([0, 1, 2] * 10, [0, 1, 2, 3] * 5, "class only in test"),
    "one class": ([0] * 30, [0] * 10, "one class"),
}


@pytest.mark.parametrize("case", FEATURE_LABEL_CASES)
def test_features_labels_outside_the_classes_are_found_by_data_check_and_refused_before_a_run(case, tmp_path, capsys):
    train, test, says = FEATURE_LABEL_CASES[case]
    root = make_features(tmp_path / "feats")
    _labels(root, "train", train)
    _labels(root, "test", test)
    code, out, _ = run_cli(capsys, "data", "check", "features", "--root", root)
    assert code == 1 and says in out, out
    runs = tmp_path / "runs"
    code, _, err = run_cli(capsys, "train", *FEATURES_TINY, f"data.root={root}", f"output_dir={runs}")
    assert code == 2 and says in err and "labels" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not runs.exists(), "a run folder was made for data that was refused"


def test_a_class_without_test_samples_is_a_note_not_a_problem(tmp_path, capsys):
    root = make_features(tmp_path / "feats")
    _labels(root, "train", [0, 1, 2, 3] * 10)
    _labels(root, "test", [0, 1, 2] * 5)
    code, out, _ = run_cli(capsys, "data", "check", "features", "--root", root)
    assert code == 0, out
    assert "problems: 0" in out and "note: class(es) 3 have training samples but none in test" in out


@pytest.mark.parametrize("damage", ["NaN features", "row-count mismatch"])
def test_broken_feature_arrays_are_refused_before_a_run_folder_is_made(damage, tmp_path, capsys):
    root = make_features(tmp_path / "feats")
    vec = np.load(root / "test" / "vec.npy")
    if damage == "NaN features":
        vec[7, 2] = np.nan
    else:
        vec = vec[:-3]
    np.save(root / "test" / "vec.npy", vec)
    runs = tmp_path / "runs"
    code, _, err = run_cli(capsys, "train", *FEATURES_TINY, f"data.root={root}", f"output_dir={runs}")
    assert code == 2 and str(root / "test" / "vec.npy") in err, err
    assert ("first row 7" if damage == "NaN features" else "57 rows, labels have 60") in err
    assert not runs.exists()


def test_an_undecodable_crema_d_wav_is_refused_before_a_run_folder_is_made(tmp_path, capsys):
    root = make_crema_d(tmp_path / "crema")
    (root / "AudioWAV" / "1002_T1_ANG_XX.wav").write_bytes(b"RIFF junk, not a WAV")
    runs = tmp_path / "runs"
    code, _, err = run_cli(capsys, "train", REPO / "experiments" / "crema_d_naive.yaml", *CREMA_TINY,
                           f"data.root={root}", f"output_dir={runs}")
    assert code == 2 and "undecodable WAV" in err and "1002_T1_ANG_XX.wav" in err, err
    assert not runs.exists()


def test_av_csv_class_only_in_test_is_refused_and_data_check_lists_it(tmp_path, capsys):
    root = make_av_csv(tmp_path / "ks")
    table = root / "data.csv"
    table.write_text(table.read_text().replace("clip13,drum,test", "clip13,bird,test"))
    code, out, _ = run_cli(capsys, "data", "check", "av_csv", "--root", root)
    assert code == 1 and "class only in test" in out and "bird" in out, out


# ---- the Python API: the same rules, in fit(...)'s words, naming the item -------------------------------------
class PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(4, 16)

    def forward(self, x):
        return {"a": self.a(x["a"]), "b": self.b(x["b"])}


def _items(n, *, label_at=None, nan_at=None, dtype=torch.float32, odd_shape_at=None, classes=3):
    gen = torch.Generator().manual_seed(n)
    out = []
    for i in range(n):
        y = i % classes
        a = torch.randn(8, generator=gen) + y
        if nan_at == i:
            a[0] = float("nan")
        if odd_shape_at == i:
            a = torch.randn(9, generator=gen)
        out.append(({"a": a.to(dtype), "b": torch.randn(4, generator=gen).to(dtype)}, y))
    if label_at is not None:
        i, y = label_at
        out[i] = (out[i][0], y)
    return out


QUIET = dict(epochs=1, batch_size=16, progress=False)
PYTHON_CASES = {
    "a float label": (dict(train=_items(60, label_at=(5, 1.5)), test=_items(30)), r"train\[5\]: target 1.5 is not a class index"),
    "a label -1": (dict(train=_items(60, label_at=(5, -1)), test=_items(30)), r"train\[5\]: target -1 is outside the classes"),
    "a test label beyond train's classes": (dict(train=_items(60), test=_items(30, label_at=(7, 7))),
                                            r"test\[7\]: class 7 is outside the 3 classes"),
    "a held-out class train lacks": (dict(train=[(x, 0 if y == 1 else y) for x, y in _items(60)],
                                          test=[(x, 0 if y == 1 else y) for x, y in _items(30)],
                                          held_out=_items(30)), r"held_out\[1\]: class 1, which no training item has"),
    "a test class train lacks (in range)": (dict(train=_items(60, classes=2), test=_items(30, classes=2),
                                                 held_out=_items(30, classes=3)), r"held_out\[2\]: class 2 is outside the 2 classes"),
    "float64 inputs": (dict(train=_items(60, dtype=torch.float64), test=_items(30)),
                       r"fit\(model=\.\.\.\): its forward failed on the first training items \(inputs: a float64 \(2, 8\)"),
    "a wrong-shape item": (dict(train=_items(60, odd_shape_at=17), test=_items(30)),
                           r"train\[17\]: inputs of shape \{'a': \(9,\)\}, while train\[0\] has \{'a': \(8,\)\}"),
    "NaN in test inputs": (dict(train=_items(60), test=_items(30, nan_at=3)),
                           r"test: the model's outputs are NaN or inf for 1 of 30 items"),
}


@pytest.mark.parametrize("case", PYTHON_CASES)
def test_fit_checks_its_inputs_and_names_the_item(case, tmp_path):
    data, says = PYTHON_CASES[case]
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=says):
        blendtune.fit(PairNet, **data, **QUIET, run_dir=run_dir)
    if case != "NaN in test inputs":  # found while evaluating, after training began
        assert not run_dir.exists()


# ---- storage faults: a full disk, on a real (tiny) file system --------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path, request):
    """A small tmpfs (192 KiB: room for a run's config and metrics, not for its checkpoint; or the size the
    test asks for with @pytest.mark.parametrize("tiny_disk", [...], indirect=True)). Needs root, as CI has."""
    import subprocess
    size = getattr(request, "param", "192k")
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


BIG_CHECKPOINT = [*TINY, "train.epochs=1", "model.encoders.clean.hidden=256", "model.encoders.memorizable.hidden=256"]


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_path_and_leaves_no_partial_file(tiny_disk, capsys):
    code, _, err = run_cli(capsys, "train", REPO / "experiments" / "synthetic_naive.yaml", *BIG_CHECKPOINT,
                           f"output_dir={tiny_disk}")
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert "no space left on the device writing checkpoint" in line and str(tiny_disk) in line and "last.pt" in line, err
    assert "Traceback" not in err
    assert not list(tiny_disk.rglob("*.tmp")), list(tiny_disk.rglob("*"))


@pytest.mark.parametrize("tiny_disk", ["8m"], indirect=True)
def test_a_resume_on_a_full_disk_leaves_the_run_as_it_was(tiny_disk, tmp_path, capsys):
    # a 1-epoch run with a small model on the tiny disk, then the disk filled: the resume's config write fails
    code, out, err = run_cli(capsys, "train", REPO / "experiments" / "synthetic_naive.yaml", *TINY, "train.epochs=1",
                             f"output_dir={tiny_disk}")
    assert code == 0, err
    run_dir = next(tiny_disk.iterdir())
    config = (run_dir / "config.yaml").read_bytes()
    filler = tiny_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    code, _, err = run_cli(capsys, "train", "--resume", run_dir, "train.epochs=2")
    assert code == 2 and "No space left on device" in err and str(run_dir / "config.yaml") in err, err
    assert (run_dir / "config.yaml").read_bytes() == config
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob(".*.tmp"))


def test_wandb_online_with_a_key_but_no_server_is_one_line_before_anything_is_created(tmp_path, capsys, monkeypatch):
    import socket
    with socket.socket() as s:  # a port nothing listens on: a real refused connection
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    runs = tmp_path / "runs"
    code, _, err = run_cli(capsys, "train", REPO / "experiments" / "synthetic_naive.yaml", *TINY, "wandb=true",
                           f"output_dir={runs}")
    assert code == 2 and f"W&B at http://127.0.0.1:{port} cannot be reached" in err and "WANDB_MODE=offline" in err, err
    assert len(err.strip().splitlines()) == 1 and not runs.exists()


def test_half_built_caches_a_killed_data_prepare_left_are_removed_by_the_next_one(tmp_path, capsys):
    import socket
    import subprocess
    import sys
    from blendtune.data.clip_cache import CACHE_DIR
    root = make_crema_d(tmp_path / "crema")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    caches = root / CACHE_DIR
    host = socket.gethostname()
    orphan = caches / f".crema_d-0123456789ab.tmp-{host}-{int(dead.stdout)}"  # its process is gone: a kill midway
    building = caches / f".crema_d-0123456789ab.tmp-{host}-{os.getpid()}"    # a live build: left alone
    for folder in (orphan, building):
        folder.mkdir(parents=True)
        (folder / "waves.npy").write_bytes(b"\0" * 1024)
    code, out, err = run_cli(capsys, "data", "prepare", "crema_d", "--root", root, *[o for o in CREMA_TINY if "crema_d." in o])
    assert code == 0, err
    assert not orphan.exists() and building.exists()
    assert "removed 1 half-built cache(s)" in err
    assert not [p for p in caches.iterdir() if p.name.startswith(".") and p != building]

"""Reliability, round two (issue 26): each test here failed with one of the deliberate bugs of that issue in
place, which no other test caught, and checks what a user would: PMR's prototype EMA, MLA's projector, a new
batch order every epoch, atomic checkpoints, the last epoch's checkpoint; and a run's files after a kill
(a torn last line in metrics.jsonl, an orphaned `last.pt.tmp`)."""
import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from blendtune.checkpoint import load_checkpoint, save_checkpoint
from blendtune.config import load_config
from blendtune.errors import UserError
from blendtune.functional import owm_projector_update
from blendtune.loggers import MetricsFile, read_metrics
from blendtune.build import build_trainer
from conftest import REPO, TINY

TORN = "blendtune: metrics.jsonl: dropped a torn last line (a write cut off)"


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def _trainer(*extra, run_dir=None):
    return build_trainer(load_config(None, TINY + list(extra)), run_dir)


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "blendtune.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


# ---- (a) PMR's prototype EMA: c <- m c_old + (1 - m) c_new, from epoch 3 ----------------------------------
def _pmr_prototypes_and_class_means(trainer):
    """Train; at the start of each epoch, PMR's prototypes and, by hand, each class's mean feature over the
    whole training set (prototype_fraction=1.0) from the model as it is then."""
    seen = []
    start = trainer.strategy.on_epoch_start
    train = trainer.splits.train

    def on_epoch_start(epoch, context):
        start(epoch, context)
        model, was_training = trainer.model, trainer.model.training
        with torch.no_grad():
            feats = model.eval().encoders(train.inputs)
        model.train(was_training)
        means = {m: torch.stack([f[train.targets == c].mean(0) for c in range(trainer.splits.num_classes)])
                 for m, f in feats.items()}
        seen.append({"epoch": epoch, "prototypes": {m: p.clone() for m, p in trainer.strategy.prototypes.items()},
                     "means": means})
    trainer.strategy.on_epoch_start = on_epoch_start
    trainer.fit()
    return seen


def test_pmr_prototypes_follow_the_features_every_epoch_at_the_default_momentum_0():
    # momentum 0 (the default, the authors' runs): the prototypes are each epoch's class means, epoch 3 and
    # later included. (Old and new swapped in the EMA froze them at epoch 2's for the rest of the run.)
    trainer = _trainer("strategy=pmr", "train.epochs=4", "pmr.prototype_fraction=1.0")
    seen = _pmr_prototypes_and_class_means(trainer)
    assert [s["epoch"] for s in seen] == [1, 2, 3, 4]
    for m in trainer.model.modalities:
        for now, before in zip(seen[1:], seen):
            assert not torch.allclose(now["means"][m], before["means"][m], atol=1e-3), (m, now["epoch"])  # it trains
        for s in seen:
            assert _max_diff(s["prototypes"][m], s["means"][m]) < 1e-5, \
                f"{m}: the prototypes at epoch {s['epoch']} are not that epoch's class means"


def test_pmr_prototype_ema_weighs_the_old_prototypes_by_the_momentum():
    m_ = 0.3
    trainer = _trainer("strategy=pmr", "train.epochs=4", f"pmr.momentum={m_}", "pmr.prototype_fraction=1.0")
    seen = _pmr_prototypes_and_class_means(trainer)
    for m in trainer.model.modalities:
        for s in seen[:2]:  # epochs 1 and 2: plain class means (the untrained model's never enter the EMA)
            assert _max_diff(s["prototypes"][m], s["means"][m]) < 1e-5, (m, s["epoch"])
        for now, before in zip(seen[2:], seen[1:]):  # epochs 3, 4: by hand, old = the previous epoch's prototypes
            old, new = before["prototypes"][m], now["means"][m]
            assert not torch.allclose(old, new, atol=1e-3)  # the two weightings are told apart
            assert _max_diff(now["prototypes"][m], m_ * old + (1 - m_) * new) < 1e-5, \
                f"{m}: epoch {now['epoch']}'s prototypes are not {m_} * old + {1 - m_} * new"


# ---- (b) MLA: each turn's projector update uses that turn's modality's features --------------------------
def test_mla_projector_is_built_from_each_turns_own_modality():
    trainer = _trainer("strategy=mla", "train.epochs=2")
    modalities = trainer.model.modalities
    batches = []  # each training forward's features, per modality (the turns of that batch use them)
    trainer.model.register_forward_hook(
        lambda module, args, out: batches.append({m: f.detach().float().clone() for m, f in out.features.items()})
        if module.training else None)
    trainer.fit()
    steps = len(trainer.train_loader)
    assert len(batches) == 2 * steps
    means = [{m: f.mean(0) for m, f in b.items()} for b in batches]
    assert not torch.allclose(means[0][modalities[0]], means[0][modalities[1]], atol=1e-3)  # the modalities differ
    # by hand: P starts at I; every turn but the run's first updates it with its own modality's batch-mean
    # feature, alpha = 0.1 ** (1 + batch / steps per epoch)
    p = torch.eye(trainer.model.fusion.fc.in_features)
    first = True
    for i, mean in enumerate(means):
        alpha = 0.1 ** (1 + (i % steps) / steps)
        for m in modalities:
            if not first:
                p = owm_projector_update(p, mean[m], alpha)
            first = False
    assert _max_diff(trainer.strategy.projector, p) < 1e-6, \
        "MLA's projector is not the OWM updates of each turn's own modality's mean feature"


# ---- (c) a new batch order every epoch ---------------------------------------------------------------------
def _batch_orders(trainer):
    """The training-set indices of each epoch's batches, in the order the loop trained on them."""
    orders, training = [], [False]
    dataset = trainer.splits.train
    fetch, steps = dataset.__getitems__, trainer.train_steps

    def getitems(indices):
        if training[0]:
            orders[-1].extend(torch.as_tensor(indices).tolist())
        return fetch(indices)

    def train_steps(model, batches, optimizer, scaler, strategy, epoch, main):
        training[0] = main
        if main:
            orders.append([])
        try:
            return steps(model, batches, optimizer, scaler, strategy, epoch, main)
        finally:
            training[0] = False
    dataset.__getitems__, trainer.train_steps = getitems, train_steps
    trainer.fit()
    return orders


def test_every_epoch_draws_a_new_batch_order_and_the_seed_repeats_it():
    trainer = _trainer("train.epochs=3")
    orders = _batch_orders(trainer)
    n = len(trainer.splits.train)
    assert len(orders) == 3 and all(sorted(o) == list(range(n)) for o in orders)  # each epoch: every sample once
    for a in range(3):
        for b in range(a):
            assert orders[a] != orders[b], f"epochs {b + 1} and {a + 1} trained on the same batch order"
            assert orders[a][:32] != orders[b][:32], f"epochs {b + 1} and {a + 1} began with the same batch"
    assert _batch_orders(_trainer("train.epochs=3")) == orders  # the same seed, the same orders


# ---- (d) a checkpoint write killed midway ------------------------------------------------------------------
KILLED_WRITE = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    from blendtune.checkpoint import save_checkpoint

    path = sys.argv[1]
    state = torch.load(path, weights_only=True)
    state["epoch"] += 1
    real_save = torch.save

    def killed_midway(obj, f, *args, **kwargs):  # half the file written, then SIGKILL: no cleanup runs
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        out = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        out.flush()
        os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = killed_midway
    save_checkpoint(__import__("pathlib").Path(path), state)
""")


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one_loadable_and_intact(tmp_path):
    trainer = _trainer("train.epochs=1", run_dir=tmp_path)
    trainer.fit()
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    before = checkpoint.read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(checkpoint)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # killed inside the write
    assert checkpoint.read_bytes() == before, "a write killed midway changed last.pt"
    assert load_checkpoint(checkpoint)["epoch"] == 1
    # and the run resumes from it: epoch 2 trains on
    resumed = _trainer("train.epochs=2", run_dir=tmp_path)
    resumed.load(checkpoint)
    assert resumed.epoch == 1 and resumed.fit()["epoch"] == 2
    assert load_checkpoint(checkpoint)["epoch"] == 2
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.pt"]  # the killed write's partial file: gone


# ---- (e) the last epoch's checkpoint when checkpoint_every does not divide epochs --------------------------
def test_the_checkpoint_after_training_is_at_the_last_epoch(tmp_path):
    trainer = _trainer("train.epochs=5", "train.checkpoint_every=2", run_dir=tmp_path)
    saved, save = [], trainer.save
    trainer.save = lambda path: (saved.append(trainer.epoch), save(path))
    trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["epoch"] == 5, f"training ended at epoch 5, its checkpoint is at epoch {state['epoch']}"
    assert saved == [2, 4, 5]
    assert all(torch.equal(state["model"][k], v.cpu()) for k, v in trainer.model.state_dict().items())


# ---- a torn last line in metrics.jsonl ----------------------------------------------------------------------
def test_resume_after_a_torn_last_metrics_line_drops_it_and_goes_on(tmp_path):
    proc = cli("train", "experiments/synthetic_naive.yaml", *TINY, f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    metrics = run_dir / "metrics.jsonl"
    whole = json.dumps({**read_metrics(metrics)[-1], "epoch": 3})
    with metrics.open("a") as f:  # epoch 3's line, cut off halfway (the run killed mid-append)
        f.write(whole[: len(whole) // 2])
    proc = cli("train", "--resume", run_dir, "train.epochs=3")
    assert proc.returncode == 0, proc.stderr
    assert "resuming at epoch 3 of 3" in proc.stdout
    assert proc.stderr.count(TORN) == 1, proc.stderr
    assert [r["epoch"] for r in read_metrics(metrics)] == [1, 2, 3]
    assert all(line.startswith("{") and line.endswith("}") for line in metrics.read_text().splitlines())
    assert load_config(run_dir / "config.yaml").train.epochs == 3
    # a line broken before the last one is not a cut-off write: one clear line, exit 2
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], lines[1][:40], lines[2]]) + "\n")
    proc = cli("train", "--resume", run_dir, "train.epochs=4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"'{metrics}' line 2 is not an epoch's metrics" in proc.stderr
    assert load_config(run_dir / "config.yaml").train.epochs == 3  # refused before config.yaml was rewritten


def test_metrics_file_drops_only_a_torn_last_line_and_says_so_once(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"epoch": e, "loss": 0.5 / e}) for e in (1, 2, 3)]
    path.write_text("".join(r + "\n" for r in rows) + rows[2][:7])  # a 4th write cut off
    assert [r["epoch"] for r in read_metrics(path)] == [1, 2, 3]
    assert capsys.readouterr().err.count(TORN) == 1
    MetricsFile(path, from_epoch=2)  # a resume from epoch 2's checkpoint
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"  # the kept lines byte for byte
    assert capsys.readouterr().err.count(TORN) == 1
    assert read_metrics(path) == [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    # a broken line in the middle: an error naming it, the file left as it was
    broken = rows[0] + "\n" + rows[1][:9] + "\n" + rows[2] + "\n"
    path.write_text(broken)
    for read in (read_metrics, lambda p: MetricsFile(p, from_epoch=3)):
        with pytest.raises(UserError, match=r"metrics.jsonl' line 2 is not an epoch's metrics"):
            read(path)
    assert path.read_text() == broken


# ---- orphaned temporary checkpoints -------------------------------------------------------------------------
def test_an_orphaned_last_pt_tmp_is_removed_by_the_next_resume_or_save(tmp_path):
    from blendtune.runs import resume_config, write_config
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(run_dir, load_config(REPO / "experiments" / "synthetic_naive.yaml", TINY))
    folder = run_dir / "checkpoints"
    folder.mkdir()
    orphan = folder / "last.pt.tmp"  # what a SIGKILL during a write leaves (see the (d) test for a real one)
    # killed during the first write: nothing to resume from, and nothing else would ever remove it
    orphan.write_bytes(b"PK\x03\x04 half a checkpoint")
    with pytest.raises(UserError, match=r"no checkpoint at .*last.pt' \(its first write was cut off: removed the "
                                        r"partial 'last.pt.tmp'\)"):
        resume_config(run_dir, ["train.epochs=3"])
    assert not orphan.exists()
    # killed during a later write: the resume goes on from last.pt and removes the partial file
    save_checkpoint(folder / "last.pt", {"epoch": 2, "w": torch.arange(5)})
    orphan.write_bytes(b"PK\x03\x04 half a checkpoint")
    assert resume_config(run_dir, ["train.epochs=3"]).train.epochs == 3
    assert not orphan.exists()
    # the next save replaces it, and leaves nothing but last.pt
    orphan.write_bytes(b"PK\x03\x04 half a checkpoint")
    save_checkpoint(folder / "last.pt", {"epoch": 3, "w": torch.arange(5)})
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"] and load_checkpoint(folder / "last.pt")["epoch"] == 3


def test_a_failed_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as out:
            out.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match=f"no space left on the device writing checkpoint '{path}' .the previous one is kept"):
        save_checkpoint(path, {"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1

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


def has_shared_data() -> bool:
    root = Path(os.environ["BLENDTUNE_DATA_ROOT"])
    return (root / "fsdd" / "recordings").is_dir() and (root / "mnist" / "mnist5k.npz").is_file()


needs_data = pytest.mark.skipif(not has_shared_data(), reason="shared FSDD/MNIST data not found (BLENDTUNE_DATA_ROOT)")

# A tiny synthetic setting every fast test builds on: seconds per run on 2 CPU cores.
TINY = ["data.dataset=synthetic", "data.synthetic.num_train=200", "data.synthetic.num_test=100",
        "data.held_out_ratio=0.2", "data.batch_size=32", "train.epochs=2", "train.progress=false",
        "data.synthetic.modalities.memorizable.memorize_dims=64", "wandb=false"]


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

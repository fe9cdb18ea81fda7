"""Issue 4: the dataset adapters on tiny trees in each layout, device-side spectrograms, data check,
bad files in training."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from blendtune.config import load_config
from blendtune.data import DATASETS, build_splits
from blendtune.data.audio import LogSpectrogram
from blendtune.worker import build_trainer
from conftest import AV_CSV_TINY, CREMA_TINY, REPO, make_av_csv, make_crema_d, make_features, write_frames


def trainer(overrides, tmp_path=None):
    return build_trainer(load_config(None, overrides), run_dir=tmp_path)


def cli(*args, env_root=None):
    return subprocess.run([sys.executable, "-m", "blendtune.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_crema_d_layout_trains_one_epoch_with_loader_workers(tmp_path):
    root = make_crema_d(tmp_path / "crema")
    t = trainer([*CREMA_TINY, f"data.root={root}", "data.num_workers=2", "data.held_out_by_group=true"])
    assert len(t.splits.train) + len(t.splits.held_out) == 24 and len(t.splits.test) == 12
    assert t.splits.train.input_shapes == {"audio": (1, 65, 63), "visual": (2, 3, 32, 32)}
    assert set(t.splits.held_out.groups).isdisjoint(t.splits.train.groups)  # whole actors held out
    metrics = t.fit()
    assert metrics["epoch"] == 1 and np.isfinite(metrics["loss/objective"])
    assert 0.0 <= metrics["acc/test/fused"] <= 1.0


def test_crema_d_defaults_give_ogm_ge_spectrogram_shape(tmp_path):
    root = make_crema_d(tmp_path / "crema", per_class=1)
    train, _ = DATASETS.get("crema_d")(root=str(root), **_options("crema_d")).build()
    inputs, target = train[0]
    assert inputs["audio"].shape == (1, 257, 188)           # 22.05 kHz, 3 s, n_fft 512, hop 353
    assert inputs["visual"].shape == (1, 3, 224, 224)
    assert target.item() == 0 and train.classes[0] == "NEU"


def _options(name, *overrides):
    from blendtune.worker import dataset_options
    return dataset_options(load_config(None, [f"data.dataset={name}", *overrides]))


def test_device_side_spectrogram_equals_loader_side(tmp_path):
    root = make_crema_d(tmp_path / "crema", per_class=1)
    options = _options("crema_d")
    adapter = DATASETS.get("crema_d")(root=str(root), **options)
    on_loader, _ = adapter.build(spectrogram_on="loader")
    on_device, _ = adapter.build(spectrogram_on="device")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transform = on_device.device_transforms["audio"].to(device)
    waves = torch.stack([on_device[i][0]["audio"] for i in range(6)])
    assert waves.shape == (6, 66150)  # the loader now returns waveforms
    batched = transform(waves.to(device)).cpu()
    expected = torch.stack([on_loader[i][0]["audio"] for i in range(6)])
    assert batched.shape == expected.shape == (6, 1, 257, 188)
    assert_same_log_spectrogram(batched, expected)
    # and the trainer applies it: same shapes reach the model either way
    t = trainer([*CREMA_TINY, f"data.root={root}", "data.spectrogram_on=device"])
    inputs, _ = t._to_device(next(iter(t.train_loader)))
    assert inputs["audio"].shape[1:] == t.splits.train.input_shapes["audio"]


def assert_same_log_spectrogram(a: torch.Tensor, b: torch.Tensor) -> None:
    """log(|X| + 1e-7) from two FFT implementations (CPU vs cuFFT). A float32 FFT's error is about
    eps * log2(n) of the frame's largest bin, absolute; in the log domain that is divided by the bin's
    own magnitude, so near-silent bins may differ a lot (GPU vs CPU: 0.029 on 0.2% of bins). Compare
    magnitudes against that bound (10x margin), and logs tightly where the bin is not tiny."""
    mag_a, mag_b = a.exp() - 1e-7, b.exp() - 1e-7
    frame_max = torch.maximum(mag_a, mag_b).amax(dim=-2, keepdim=True)  # per clip and frame
    bound = 10 * torch.finfo(torch.float32).eps * math.log2(2 * (a.shape[-2] - 1)) * frame_max
    assert ((mag_a - mag_b).abs() <= bound + 1e-6).all(), ((mag_a - mag_b).abs() - bound).max()
    loud = torch.maximum(mag_a, mag_b) > 1e-3 * frame_max
    torch.testing.assert_close(a[loud], b[loud], atol=1e-3, rtol=1e-4)


def test_log_mel_per_clip_does_not_depend_on_the_batch():
    spec = LogSpectrogram(8000, 256, 80, n_mels=40)
    waves = torch.randn(3, 8000) * torch.tensor([[0.01], [1.0], [0.1]])
    torch.testing.assert_close(spec(waves)[0], spec(waves[0]))


def test_av_csv_layout_trains_one_epoch(tmp_path):
    root = make_av_csv(tmp_path / "ks")
    t = trainer([*AV_CSV_TINY, f"data.root={root}"])
    assert t.splits.train.classes == ["dog", "drum", "rain"] and len(t.splits.test) == 6
    metrics = t.fit()
    assert np.isfinite(metrics["loss/objective"]) and "acc/test/fused" in metrics


def test_av_csv_multilabel_uses_bce_and_reports_map(tmp_path):
    root = make_av_csv(tmp_path / "as", multilabel=True)
    t = trainer([*AV_CSV_TINY, f"data.root={root}", "data.av_csv.multilabel=true", "strategy=ogm_ge"])
    assert t.splits.train.targets.dtype == torch.float32 and t.splits.train.targets.sum(1).max() == 2
    metrics = t.fit()
    assert 0.0 < metrics["map/test/fused"] <= 1.0 and "acc/test/fused" not in metrics
    assert np.isfinite(metrics["ogm/coeff/audio"])


def test_features_layout_any_number_of_modalities(tmp_path):
    root = make_features(tmp_path / "feats")
    t = trainer([f"data.root={root}", "data.dataset=features", "train.epochs=3", "train.progress=false",
                 "wandb=false", "optim.name=adam", "optim.lr=0.003", "strategy=gblend", "gblend.super_epoch=1"])
    assert t.splits.train.input_shapes == {"seq": (5, 6), "vec": (8,)}
    metrics = t.fit()
    assert metrics["acc/test/vec"] > 0.8  # the vector modality carries the class; seq is noise
    assert metrics["gblend/w/vec"] > metrics["gblend/w/seq"]


def test_features_multilabel_labels_file(tmp_path):
    root = make_features(tmp_path / "feats", multilabel=True)
    metrics = trainer([f"data.root={root}", "data.dataset=features", "train.epochs=1", "train.progress=false",
                       "wandb=false"]).fit()
    assert "map/held_out/fused" in metrics


def test_average_precision_by_hand():
    from blendtune.functional import average_precision
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.1, 0.6]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # class 0: ranks 1 (hit), 2, 3 (hit) -> (1 + 2/3) / 2; class 1: rank 1 hit -> 1
    torch.testing.assert_close(average_precision(scores, labels), torch.tensor([5 / 6, 1.0], dtype=torch.float64))


# ---- data check and bad files ----------------------------------------------------------------------------
def break_crema_d(root):
    """One of each kind of bad sample; returns what `data check` must name."""
    (root / "AudioWAV" / "1001_T0_NEU_XX.wav").unlink()                                   # missing file
    (root / "AudioWAV" / "1001_T1_HAP_XX.wav").write_bytes(b"RIFF\x00\x00not a wav")       # undecodable WAV
    (root / "Image-01-FPS" / "1002_T0_SAD_XX" / "001.jpg").write_bytes(b"\xff\xd8 broken")  # undecodable JPEG
    for f in (root / "Image-01-FPS" / "1002_T1_FEA_XX").iterdir():                        # empty frame folder
        f.unlink()
    with open(root / "train.csv", "a") as f:
        f.write("1001_T0_BOR_XX,BOR\n")                                                    # unknown label
    return {"missing file", "undecodable WAV", "undecodable JPEG", "empty frame folder", "unknown label"}


def test_data_check_lists_every_kind_of_bad_file_and_exits_nonzero(tmp_path):
    root = make_crema_d(tmp_path / "crema")
    clean = cli("data", "check", "crema_d", "--root", root)
    assert clean.returncode == 0, clean.stderr
    assert "problems: 0" in clean.stdout and "train" in clean.stdout and "ANG" in clean.stdout
    kinds = break_crema_d(root)
    proc = cli("data", "check", "crema_d", "--root", root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "problems: 5" in proc.stdout
    for kind in kinds:
        assert kind in proc.stdout
    for name in ("1001_T0_NEU_XX.wav", "1001_T1_HAP_XX.wav", "1002_T0_SAD_XX/001.jpg", "1002_T1_FEA_XX", "BOR"):
        assert name in proc.stdout


def test_data_check_other_layouts(tmp_path):
    root = make_av_csv(tmp_path / "ks")
    (root / "audio" / "clip03.wav").write_bytes(b"junk")
    proc = cli("data", "check", "av_csv", "--root", root)
    assert proc.returncode == 1 and "undecodable WAV" in proc.stdout and "clip03.wav" in proc.stdout
    feats = make_features(tmp_path / "feats")
    np.save(feats / "test" / "labels.npy", np.zeros(5, dtype=np.int64))
    proc = cli("data", "check", "features", "--root", feats)
    assert proc.returncode == 1 and "length mismatch" in proc.stdout
    from conftest import make_tiny_avdigits
    make_tiny_avdigits(tmp_path / "av", broken="1_cid_3.wav")
    proc = cli("data", "check", "avdigits", "--root", tmp_path / "av", "data.avdigits.test_speakers=[cid]")
    assert proc.returncode == 1 and "1_cid_3.wav" in proc.stdout and "undecodable WAV" in proc.stdout


def test_training_fails_fast_naming_the_first_bad_file(tmp_path):
    root = make_crema_d(tmp_path / "crema")
    (root / "AudioWAV" / "1002_T1_ANG_XX.wav").unlink()
    proc = cli("train", REPO / "experiments" / "crema_d_naive.yaml", *CREMA_TINY, f"data.root={root}",
               f"output_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2
    assert "1002_T1_ANG_XX.wav" in proc.stderr and "data.skip_bad=true" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_undecodable_frame_found_in_a_loader_worker_is_named(tmp_path):
    root = make_crema_d(tmp_path / "crema")
    (root / "Image-01-FPS" / "1001_T0_DIS_XX" / "000.jpg").write_bytes(b"\xff\xd8 broken")
    (root / "Image-01-FPS" / "1001_T0_DIS_XX" / "001.jpg").write_bytes(b"\xff\xd8 broken")
    proc = cli("train", REPO / "experiments" / "crema_d_naive.yaml", *CREMA_TINY, f"data.root={root}",
               "data.num_workers=2", f"output_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2, proc.stderr
    assert "cannot decode JPEG file" in proc.stderr and "1001_T0_DIS_XX" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_skip_bad_trains_without_them_and_logs_how_many(tmp_path):
    root = make_crema_d(tmp_path / "crema")
    (root / "AudioWAV" / "1002_T1_ANG_XX.wav").unlink()                          # found before training
    for i in range(2):                                                            # found while decoding
        (root / "Image-01-FPS" / "1001_T0_DIS_XX" / f"00{i}.jpg").write_bytes(b"\xff\xd8 broken")
    proc = cli("train", REPO / "experiments" / "crema_d_naive.yaml", *CREMA_TINY, f"data.root={root}",
               "data.skip_bad=true", "train.epochs=2", "data.held_out_ratio=0", f"output_dir={tmp_path / 'runs'}")
    assert proc.returncode == 0, proc.stderr
    assert "skipping 1 bad sample" in proc.stderr and "1002_T1_ANG_XX.wav" in proc.stderr
    run_dir = proc.stdout.strip().splitlines()[-1]
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    assert [r["data/skipped"] for r in rows] == [1.0, 1.0]  # the broken-frames clip, once per epoch


def test_build_splits_names_an_empty_split(tmp_path):
    root = make_crema_d(tmp_path / "crema")
    (root / "test.csv").write_text("")
    with pytest.raises(Exception, match="test split is empty"):
        build_splits("crema_d", {**_options("crema_d"), "root": str(root)}, 0.1, False, None, 0)


def test_every_jpeg_writer_frame_decodes(tmp_path):
    write_frames(tmp_path / "f", 2, 100)
    from blendtune.data.audiovisual import read_frame
    assert read_frame(tmp_path / "f" / "000.jpg").shape == (3, 24, 32)


def test_avdigits_skip_bad_drops_an_undecodable_clip(tmp_path, capfd):
    from conftest import make_tiny_avdigits
    make_tiny_avdigits(tmp_path, broken="1_cid_3.wav")
    options = {**_options("avdigits", "data.avdigits.test_speakers=[cid]"), "root": str(tmp_path)}
    with pytest.raises(Exception, match="1_cid_3.wav"):
        DATASETS.get("avdigits")(**options).build()
    train, test = DATASETS.get("avdigits")(**options).build(skip_bad=True)
    assert len(train) == 8 and len(test) == 4  # 12 good clips; the broken cid clip is gone
    assert "skipping 1 bad clip" in capfd.readouterr().err

"""Issue 4: the dataset adapters on tiny trees in each layout, device-side spectrograms, data check,
bad files in training."""
import json
import math

import numpy as np
import pytest
import torch

from blendtune.config import load_config
from blendtune.data import DATASETS, build_splits
from blendtune.data.audio import LogSpectrogram
from blendtune.errors import UserError
from blendtune.build import build_trainer
from conftest import (AV_CSV_TINY, CREMA_TINY, REPO, cli_in_process, make_av_csv, make_crema_d, make_features,
                      write_frames)


def trainer(overrides, tmp_path=None):
    return build_trainer(load_config(None, overrides), run_dir=tmp_path)


@pytest.fixture
def cli(capfd):
    """`blendtune ARGS` in this process (cli.main), as `python -m blendtune.cli` from the repository would run
    (capfd: what loader worker processes print too)."""
    return lambda *args: cli_in_process(capfd, *args)


def test_crema_d_layout_trains_one_epoch_with_loader_workers(tmp_path):
    root = make_crema_d(tmp_path / "crema")
    t = trainer([*CREMA_TINY, f"data.root={root}", "data.num_workers=2", "data.held_out_by_group=true"])
    assert len(t.splits.train) + len(t.splits.held_out) == 24 and len(t.splits.test) == 12
    assert t.splits.train.input_shapes == {"audio": (1, 65, 63), "visual": (2, 3, 32, 32)}
    assert set(t.splits.held_out.groups).isdisjoint(t.splits.train.groups)  # whole actors held out
    metrics = t.fit()
    assert metrics["epoch"] == 1 and np.isfinite(metrics["loss/objective"])
    # what the loader workers decoded is what this process decodes: the same evaluation, value for value
    t.loader_workers = 0
    in_process = t.evaluate(t.model, test=True).metrics()
    assert {k: metrics[k] for k in in_process} == pytest.approx(in_process, rel=1e-6, abs=1e-9)


ADAM = ["optim.name=adam", "optim.lr=0.003"]  # the tiny trees learn in a few epochs with it


def test_crema_d_tiny_tree_is_learned_well_above_chance(tmp_path):
    # six emotions, each its own tone and frame colour: learnable, so the test actor is recognised
    root = make_crema_d(tmp_path / "crema")
    t = trainer([*CREMA_TINY, f"data.root={root}", *ADAM, "train.epochs=10"])
    before = t.evaluate(t.model, test=True).metrics()["acc/test/fused"]
    metrics = t.fit()
    assert metrics["acc/test/fused"] > 0.5 > before  # chance: 1/6


def test_crema_d_defaults_give_ogm_ge_spectrogram_shape(tmp_path):
    root = make_crema_d(tmp_path / "crema", per_class=1)
    train, _ = DATASETS.get("crema_d")(root=str(root), **_options("crema_d")).build()
    inputs, target = train[0]
    assert inputs["audio"].shape == (1, 257, 188)           # 22.05 kHz, 3 s, n_fft 512, hop 353
    assert inputs["visual"].shape == (1, 3, 224, 224)
    assert target.item() == 0 and train.classes[0] == "NEU"


def _options(name, *overrides):
    from blendtune.build import dataset_options
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
    inputs, _ = t.feed.to_device(next(iter(t.train_loader)))
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


def test_log_spectrogram_peaks_at_the_frequency_bin_of_a_sine():
    t = torch.arange(8000) / 8000
    sine = torch.sin(2 * math.pi * 1000 * t)  # 1 s at 8 kHz, amplitude 1
    stft = LogSpectrogram(8000, 256, 80)(sine)[0]  # log |X|, (129 bins, 101 frames)
    assert stft.shape == (129, 101)
    inner = stft[:, 2:-2]  # frames away from the padded ends
    assert (inner.argmax(0) == 1000 * 256 // 8000).all()  # bin 32: 31.25 Hz per bin
    # a periodic Hann window of 256 sums to 128: |X| = amplitude / 2 * 128 = 64, log-magnitude
    torch.testing.assert_close(inner[32], torch.full((97,), math.log(64.0)), atol=1e-3, rtol=0)
    log_mel = LogSpectrogram(8000, 256, 80, n_mels=40)
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # HTK mel scale, 40 filters from 0 to 4 kHz
    centres = torch.linspace(0, mel(4000), 42)[1:-1]
    for freq in (300, 1000, 2500):
        spec = log_mel(torch.sin(2 * math.pi * freq * t))[0]
        assert (spec[:, 2:-2].argmax(0) == (centres - mel(freq)).abs().argmin()).all(), freq
        assert spec.max() - spec.min() == pytest.approx(80.0, abs=1e-3)  # dB, clipped at top_db 80


def test_frames_are_imagenet_normalised(tmp_path):
    from torchvision.io import encode_jpeg, write_file
    root = make_crema_d(tmp_path / "crema", per_class=1)
    colour = (200, 100, 50)
    clip = "1003_T0_NEU_XX"  # a test clip: evaluation transforms (resize, no random crop or flip)
    for path in (root / "Image-01-FPS" / clip).iterdir():
        img = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, 24, 32).contiguous()
        write_file(str(path), encode_jpeg(img, quality=100))
    _, test = DATASETS.get("crema_d")(root=str(root), **_options("crema_d", "data.crema_d.image_size=32",
                                                                 "data.crema_d.num_frames=2")).build()
    frames = test[[s.id for s in test.samples].index(clip)][0]["visual"]
    assert frames.shape == (2, 3, 32, 32)
    expected = [(c / 255 - m) / sd for c, m, sd in zip(colour, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    torch.testing.assert_close(frames.mean(dim=(0, 2, 3)), torch.tensor(expected), atol=0.03, rtol=0)
    assert frames.std(dim=(0, 2, 3)).max() < 0.02  # a constant colour stays constant


def test_av_csv_layout_is_learned_above_chance(tmp_path):
    root = make_av_csv(tmp_path / "ks")
    t = trainer([*AV_CSV_TINY, f"data.root={root}", *ADAM, "train.epochs=6"])
    assert t.splits.train.classes == ["dog", "drum", "rain"] and len(t.splits.test) == 6
    metrics = t.fit()
    assert np.isfinite(metrics["loss/objective"])
    assert metrics["acc/test/fused"] > 0.8  # 5 or 6 of the 6 test clips; chance: 1/3


def test_av_csv_multilabel_uses_bce_and_reports_map(tmp_path):
    root = make_av_csv(tmp_path / "as", multilabel=True)
    t = trainer([*AV_CSV_TINY, f"data.root={root}", "data.av_csv.multilabel=true", "strategy=ogm_ge", *ADAM,
                 "train.epochs=8"])
    assert t.splits.train.targets.dtype == torch.float32 and t.splits.train.targets.sum(1).max() == 2
    before = t.evaluate(t.model, test=True).metrics()["map/test/fused"]
    metrics = t.fit()
    assert "acc/test/fused" not in metrics and np.isfinite(metrics["ogm/coeff/audio"])
    assert metrics["map/test/fused"] > 0.8 and metrics["map/test/fused"] > before + 0.1  # chance: about 0.6
    # the reported test loss is binary cross-entropy of the fused logits, the mAP their average precision
    from torch.utils.data import DataLoader
    from blendtune.functional import average_precision
    inputs, targets = next(iter(DataLoader(t.splits.test, batch_size=len(t.splits.test),
                                           collate_fn=t.splits.test.collate_fn)))[:2]
    t.model.eval()
    with torch.no_grad():
        logits = t.model(inputs).logits["fused"]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert metrics["loss/test/fused"] == pytest.approx(bce.item(), rel=1e-5)
    assert metrics["map/test/fused"] == pytest.approx(average_precision(logits.sigmoid(), targets).nanmean().item())


def test_multilabel_loss_is_binary_cross_entropy_by_hand():
    from blendtune.functional import classification_loss
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # BCE(x, y) = log(1 + e^x) - y x, averaged over classes, then samples
    sample_1 = (math.log(2) + math.log(1 + math.exp(2))) / 2
    sample_2 = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert classification_loss(logits, targets).item() == pytest.approx((sample_1 + sample_2) / 2, rel=1e-6)
    assert classification_loss(logits, targets, reduction="sum").item() == pytest.approx(sample_1 + sample_2, rel=1e-6)
    # class indices: cross-entropy, not BCE
    assert classification_loss(logits, torch.tensor([1, 0])).item() == pytest.approx(
        (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2, rel=1e-6)


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
    metrics = trainer([f"data.root={root}", "data.dataset=features", "train.epochs=3", "train.progress=false",
                       "wandb=false", *ADAM]).fit()
    assert "acc/held_out/fused" not in metrics
    assert metrics["map/held_out/fused"] > 0.9 and metrics["map/test/fused"] > 0.9  # chance: about 0.3


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


def test_data_check_lists_every_kind_of_bad_file_and_exits_nonzero(tmp_path, cli):
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


def test_data_check_other_layouts(tmp_path, cli):
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


def test_training_fails_fast_naming_the_first_bad_file(tmp_path, cli):
    root = make_crema_d(tmp_path / "crema")
    (root / "AudioWAV" / "1002_T1_ANG_XX.wav").unlink()
    proc = cli("train", REPO / "experiments" / "crema_d_naive.yaml", *CREMA_TINY, f"data.root={root}",
               f"output_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2
    assert "1002_T1_ANG_XX.wav" in proc.stderr and "data.skip_bad=true" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_undecodable_frame_found_in_a_loader_worker_is_named(tmp_path, cli):
    root = make_crema_d(tmp_path / "crema")
    (root / "Image-01-FPS" / "1001_T0_DIS_XX" / "000.jpg").write_bytes(b"\xff\xd8 broken")
    (root / "Image-01-FPS" / "1001_T0_DIS_XX" / "001.jpg").write_bytes(b"\xff\xd8 broken")
    proc = cli("train", REPO / "experiments" / "crema_d_naive.yaml", *CREMA_TINY, f"data.root={root}",
               "data.num_workers=2", f"output_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2, proc.stderr
    assert "cannot decode JPEG file" in proc.stderr and "1001_T0_DIS_XX" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_skip_bad_trains_without_them_and_logs_how_many(tmp_path, cli):
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
    with pytest.raises(UserError, match="test split is empty"):
        build_splits("crema_d", {**_options("crema_d"), "root": str(root)}, 0.1, False, None, 0)


def test_every_jpeg_writer_frame_decodes(tmp_path):
    write_frames(tmp_path / "f", 2, 100)
    from blendtune.data.audiovisual import read_frame
    assert read_frame(tmp_path / "f" / "000.jpg").shape == (3, 24, 32)


def test_avdigits_skip_bad_drops_an_undecodable_clip(tmp_path, capfd):
    from conftest import make_tiny_avdigits
    make_tiny_avdigits(tmp_path, broken="1_cid_3.wav")
    options = {**_options("avdigits", "data.avdigits.test_speakers=[cid]"), "root": str(tmp_path)}
    with pytest.raises(UserError, match="cannot decode WAV file '.*1_cid_3.wav'"):
        DATASETS.get("avdigits")(**options).build()
    train, test = DATASETS.get("avdigits")(**options).build(skip_bad=True)
    assert len(train) == 8 and len(test) == 4  # 12 good clips; the broken cid clip is gone
    assert "skipping 1 bad clip" in capfd.readouterr().err


def test_av_csv_duplicated_ids_and_split_overlap_are_reported_and_refused(tmp_path, cli):
    root = make_av_csv(tmp_path / "ks")
    table = root / "data.csv"
    lines = table.read_text().splitlines()
    lines += ["clip00,dog,train,v0", "clip01,drum,test,v0"]  # clip00 twice in train; clip01 in train and test
    table.write_text("\n".join(lines) + "\n")
    proc = cli("data", "check", "av_csv", "--root", root)
    assert proc.returncode == 1
    assert "duplicate id" in proc.stdout and "split overlap" in proc.stdout and "'clip01' is already listed at line 3" \
        in proc.stdout, proc.stdout
    out = tmp_path / "runs"
    proc = cli("train", "experiments/synthetic_naive.yaml", *AV_CSV_TINY, f"data.root={root}", f"output_dir={out}")
    assert proc.returncode == 2 and "2 bad sample(s)" in proc.stderr and "duplicate id" in proc.stderr, proc.stderr[-1500:]
    assert not out.exists()  # refused before anything is created

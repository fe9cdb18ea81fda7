"""Frames decoded on the device, and the prepared cache every trial reuses (CREMA-D layout, tiny trees)."""
import time

import pytest
import torch

from blendtune.config import load_config
from blendtune.data import DATASETS
from blendtune.build import build_trainer, dataset_options
from conftest import CREMA_TINY, cli_in_process, make_crema_d, write_frames


def _adapter(root, *overrides):
    cfg = load_config(None, [*CREMA_TINY, f"data.root={root}", *overrides])
    return DATASETS.get("crema_d")(root=str(root), **dataset_options(cfg)), cfg


def _eval_batch(dataset):
    ev = dataset.for_evaluation()
    return ev.collate_fn([ev[i] for i in range(len(ev))])


def test_frames_decoded_on_the_device_equal_the_loader_path():
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        root = make_crema_d(Path(tmp) / "crema", per_class=1)
        adapter, _ = _adapter(root)
        on_loader, _ = adapter.build(frames_on="loader", use_cache=False)
        on_device, _ = adapter.build(frames_on="device", use_cache=False)
        loader_inputs, _, _ = _eval_batch(on_loader)
        device_inputs, _, _ = _eval_batch(on_device)
        payload = device_inputs["visual"]
        assert payload.encoded and payload.data.dtype == torch.uint8 and payload.data.dim() == 1  # JPEG bytes
        device = "cuda" if torch.cuda.is_available() else "cpu"
        decode = on_device.device_transforms["visual"].to(device)
        frames = decode(payload.to(device)).cpu()
        assert frames.shape == loader_inputs["visual"].shape == (len(on_loader), 2, 3, 32, 32)
        # CPU: the same libjpeg decode and the same resize -> identical; nvjpeg differs by rounding only
        tolerance = dict(atol=0.0, rtol=0.0) if device == "cpu" else dict(atol=0.1, rtol=0.0)
        torch.testing.assert_close(frames, loader_inputs["visual"], **tolerance)
        # training transforms run there too: random crops of the right size, normalised
        train_payload = on_device.collate_fn([on_device[i] for i in range(4)])[0]["visual"]
        train_frames = decode(train_payload.to(device))
        assert train_frames.shape == (4, 2, 3, 32, 32) and train_frames.dtype == torch.float32


def test_training_with_frames_on_the_device(tmp_path):
    root = make_crema_d(tmp_path / "crema")
    t = build_trainer(load_config(None, [*CREMA_TINY, f"data.root={root}", "data.frames_on=device",
                                         "data.spectrogram_on=device", "data.num_workers=1"]))
    inputs, _ = t.feed.to_device(next(iter(t.train_loader)))
    assert inputs["visual"].shape[1:] == t.splits.train.input_shapes["visual"]
    assert torch.isfinite(torch.tensor(t.fit()["loss/objective"]))


def test_a_broken_jpeg_decoded_on_the_device_is_named(tmp_path):
    from blendtune.errors import UserError
    root = make_crema_d(tmp_path / "crema", per_class=1)
    bad = sorted((root / "Image-01-FPS").iterdir())[0]
    for frame in bad.iterdir():
        frame.write_bytes(b"\xff\xd8 not a jpeg")
    adapter, _ = _adapter(root)
    _, test = adapter.build(frames_on="device", use_cache=False)
    train, _ = adapter.build(frames_on="device", use_cache=False)
    dataset = train if any(s.frames == bad for s in train.samples) else test
    i = next(i for i, s in enumerate(dataset.samples) if s.frames == bad)
    payload = dataset.collate_fn([dataset[i]])[0]["visual"]
    with pytest.raises(UserError, match=bad.name):
        dataset.device_transforms["visual"](payload)


def test_prepared_cache_gives_the_same_inputs_and_is_used_when_fresh(tmp_path):
    root = make_crema_d(tmp_path / "crema", per_class=1)
    adapter, _ = _adapter(root)
    direct, _ = adapter.build(use_cache=False)
    assert direct.cache is None
    cache = adapter.prepare()
    assert (cache.directory / "manifest.json").is_file() and cache.manifest["clips"] == 18
    cached, _ = adapter.build()
    assert cached.cache is not None and cached.cache.directory == cache.directory  # used automatically
    a, _, _ = _eval_batch(direct)
    b, _, _ = _eval_batch(cached)
    torch.testing.assert_close(b["audio"], a["audio"], atol=0.0, rtol=0.0)  # the same resampled waveform
    # frames were stored at 8/7 of the crop size and resized again: close to, not equal to, one resize
    assert (b["visual"] - a["visual"]).abs().mean() < 0.05
    assert not adapter.build(use_cache=False)[0].cache


def test_a_stale_cache_is_rebuilt_and_a_partial_one_never_read(tmp_path, capsys):
    from blendtune.data.clip_cache import ClipCache
    root = make_crema_d(tmp_path / "crema", per_class=1)
    adapter, _ = _adapter(root)
    first = adapter.prepare()
    built = first.manifest["fingerprint"]
    clip = sorted((root / "Image-01-FPS").iterdir())[0]
    time.sleep(0.01)
    write_frames(clip, 2, 250, seed=9)  # a source file changes (new pixels, new mtime)
    train, _ = adapter.build()
    assert "stale" in capsys.readouterr().err
    assert train.cache is not None and train.cache.manifest["fingerprint"] != built and train.cache.is_fresh(
        [s for s in adapter.catalog().samples])
    # a cache killed mid-build has no manifest: it is not a cache
    (train.cache.directory / "manifest.json").unlink()
    assert ClipCache.open(train.cache.directory, root) is None
    assert adapter.build()[0].cache is None


def test_data_prepare_command(tmp_path, capfd):
    root = make_crema_d(tmp_path / "crema", per_class=1)
    proc = cli_in_process(capfd, "data", "prepare", "experiments/crema_d_naive.yaml", "--root", root,
                          "data.crema_d.image_size=32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prepared 18 clips, 36 frames (37x37)" in proc.stdout
    assert (root / ".blendtune-cache").is_dir() and proc.stdout.strip().splitlines()[-1].startswith(str(root))

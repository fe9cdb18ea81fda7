"""Held-out splits, the synthetic set, and AV-digits built from the shared FSDD + MNIST files."""
import numpy as np
import pytest
import torch

from blendtune.data import build_splits
from blendtune.data.avdigits import avdigits, fit_to_window
from blendtune.data.base import held_out_indices
from blendtune.errors import UserError
from conftest import make_tiny_avdigits, needs_data


def test_stratified_held_out_is_seeded_disjoint_and_per_class():
    targets = np.repeat(np.arange(4), 50)
    train, held = held_out_indices(targets, 0.1, seed=3)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 200
    assert np.bincount(targets[held]).tolist() == [5, 5, 5, 5]
    again, held_again = held_out_indices(targets, 0.1, seed=3)
    assert np.array_equal(held, held_again)
    assert not np.array_equal(held, held_out_indices(targets, 0.1, seed=4)[1])


def test_group_held_out_takes_whole_groups():
    targets = np.tile(np.arange(5), 40)
    groups = np.repeat(["s1", "s2", "s3", "s4"], 50)
    train, held = held_out_indices(targets, 0.2, seed=0, groups=groups)
    held_groups, train_groups = set(groups[held]), set(groups[train])
    assert len(held_groups) == 1 and not held_groups & train_groups
    with pytest.raises(UserError, match="at least 2 groups"):
        held_out_indices(targets, 0.2, 0, groups=np.repeat(["only"], 200))


def test_synthetic_is_fixed_by_its_own_seed():
    args = dict(num_classes=3, num_train=30, num_test=10, seed=5,
                modalities={"a": dict(dim=4, signal=1.0, noise=1.0, memorize_dims=6)})
    s1 = build_splits("synthetic", args, 0.2, False, None, seed=0)
    s2 = build_splits("synthetic", args, 0.2, False, None, seed=1)
    assert s1.train.input_shapes == {"a": (10,)}
    assert torch.equal(s1.test.inputs["a"], s2.test.inputs["a"])  # same data, different run seed

    def rows(*datasets):
        return {tuple(x.tolist()) for ds in datasets for x in ds.inputs["a"]}
    # the run seed only redraws which training samples are held out: the same 30, split differently
    assert len(s1.held_out) == len(s2.held_out) == 6
    assert rows(s1.train, s1.held_out) == rows(s2.train, s2.held_out) and len(rows(s1.train, s1.held_out)) == 30
    assert not rows(s1.train) & rows(s1.held_out)
    assert rows(s1.held_out) != rows(s2.held_out)
    again = build_splits("synthetic", args, 0.2, False, None, seed=0)
    assert torch.equal(again.held_out.inputs["a"], s1.held_out.inputs["a"])  # and the same seed, the same split
    # the dataset's own seed is what changes the data
    other = build_splits("synthetic", {**args, "seed": 6}, 0.2, False, None, seed=0)
    assert not torch.equal(other.test.inputs["a"], s1.test.inputs["a"])


def test_fit_to_window_crops_centre_and_pads_both_sides():
    assert fit_to_window(torch.arange(10.0), 4).tolist() == [3.0, 4.0, 5.0, 6.0]
    assert fit_to_window(torch.ones(2), 5).tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]


AV_ARGS = dict(test_speakers=["george", "jackson"], window_s=1.0, sample_rate=8000, n_fft=256,
               hop_length=80, n_mels=40, pairing_seed=0)


@needs_data
def test_avdigits_pairs_distinct_images_of_the_same_digit_and_splits_by_speaker():
    train, test = avdigits(**AV_ARGS)
    assert len(train) == 2000 and len(test) == 1000
    assert set(test.groups) == {"george", "jackson"} and not set(train.groups) & {"george", "jackson"}
    assert train.input_shapes == {"audio": (1, 40, 101), "image": (1, 28, 28)}
    images = torch.cat([train.inputs["image"], test.inputs["image"]]).flatten(1)
    assert len(torch.unique(images, dim=0)) == 3000  # every clip has its own MNIST image
    # the image really shows the clip's digit: a nearest-class-mean classifier on train images works on test
    means = torch.stack([train.inputs["image"][train.targets == d].flatten(1).mean(0) for d in range(10)])
    pred = torch.cdist(test.inputs["image"].flatten(1), means).argmin(1)
    assert (pred == test.targets).float().mean() > 0.6
    # audio was standardised with training-speaker statistics
    assert abs(train.inputs["audio"].mean().item()) < 1e-3


def test_avdigits_on_a_tiny_tree(tmp_path):
    make_tiny_avdigits(tmp_path)
    train, test = avdigits(**{**AV_ARGS, "test_speakers": ["cid"]}, root=str(tmp_path))
    assert len(train) == 8 and len(test) == 4


def test_unreadable_wav_is_named(tmp_path):
    make_tiny_avdigits(tmp_path, broken="1_bob_7.wav")
    with pytest.raises(UserError, match=r"cannot decode WAV file '.*1_bob_7.wav'"):
        avdigits(**{**AV_ARGS, "test_speakers": ["cid"]}, root=str(tmp_path))


def test_missing_data_root_is_explained(tmp_path, monkeypatch):
    monkeypatch.delenv("BLENDTUNE_DATA_ROOT", raising=False)
    with pytest.raises(UserError, match="data root not set.*BLENDTUNE_DATA_ROOT"):
        avdigits(**AV_ARGS)
    with pytest.raises(UserError, match="not a directory"):
        avdigits(**AV_ARGS, root=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="FSDD recordings folder not found"):
        avdigits(**AV_ARGS, root=str(tmp_path))


# ---- AV-MNIST: weakened images and noisy audio on the AV-digits pairs --------------------------------
def test_pca_energy_removal_keeps_leading_components_fit_on_training_rows_only():
    from blendtune.data.avmnist import remove_pca_energy
    rng = np.random.default_rng(0)
    scales = np.array([3.0, 2.0, 1.5, 1.0, 0.5, 0.5, 0.3, 0.2])  # variance shares 0.53, 0.24, 0.13, ...
    images = (rng.normal(size=(300, 8)) * scales + 5.0).reshape(300, 2, 4).astype(np.float32)
    fit = np.arange(300) < 200
    share = lambda x: np.var(x[fit].reshape(200, -1), axis=0).sum() / np.var(images[fit].reshape(200, -1), axis=0).sum()
    kept = remove_pca_energy(images, fit, 0.4)       # keep < 60%: only the first component
    assert 0.45 < share(kept) < 0.6
    assert np.linalg.matrix_rank(kept.reshape(300, -1) - kept[fit].reshape(200, -1).mean(0), tol=1e-3) == 1
    assert 0.7 < share(remove_pca_energy(images, fit, 0.15)) < 0.85  # two components (~77%)
    np.testing.assert_allclose(remove_pca_energy(images, fit, 0.0), images, atol=1e-4)
    np.testing.assert_allclose(remove_pca_energy(images, fit, 1e-17), images, atol=1e-4)  # below float precision
    # the PCA sees the training rows only: other rows changing leaves the training images alone
    moved = images.copy()
    moved[~fit] *= 10
    np.testing.assert_allclose(remove_pca_energy(moved, fit, 0.4)[fit], kept[fit], atol=1e-4)


def test_noise_is_at_the_stated_snr_of_each_clip_and_fixed_by_its_seed():
    from blendtune.data.avmnist import add_noise
    waves = torch.zeros(4, 8000)
    waves[:, 2000:6000] = torch.randn(4, 4000) * torch.tensor([[0.1], [0.5], [1.0], [2.0]])  # centred clips
    noisy = add_noise(waves, np.full(4, 4000), snr_db=6.0, seed=1)
    snr = 10 * torch.log10(waves.pow(2).sum(1) / 4000 / (noisy - waves).pow(2).mean(1))
    assert torch.allclose(snr, torch.full((4,), 6.0), atol=0.3)
    assert torch.equal(noisy, add_noise(waves, np.full(4, 4000), 6.0, seed=1))
    assert not torch.equal(noisy, add_noise(waves, np.full(4, 4000), 6.0, seed=2))


def test_avmnist_builds_from_its_config_on_a_tiny_tree(tmp_path):
    from blendtune.config import load_config
    from blendtune.data.base import DATASETS
    from blendtune.build import dataset_options
    make_tiny_avdigits(tmp_path)
    options = dataset_options(load_config(None, ["data.dataset=avmnist", "data.avmnist.test_speakers=[cid]",
                                                 "data.avmnist.snr_db=10"]))
    train, test = DATASETS.get("avmnist")(root=str(tmp_path), **options).build()
    clean_train, _ = avdigits(**{**AV_ARGS, "test_speakers": ["cid"]}, root=str(tmp_path))
    assert len(train) == 8 and len(test) == 4 and train.input_shapes == clean_train.input_shapes
    assert not torch.allclose(train.inputs["audio"], clean_train.inputs["audio"])
    with pytest.raises(UserError, match="data.avmnist.image_energy_removed"):
        load_config(None, ["data.dataset=avmnist", "data.avmnist.image_energy_removed=1.5"])


@needs_data
def test_avmnist_images_keep_under_a_quarter_of_their_variance_and_still_show_the_digit():
    from blendtune.data.avmnist import avmnist
    train, test = avmnist(**AV_ARGS, image_energy_removed=0.75, snr_db=0.0, noise_seed=0)
    clean, _ = avdigits(**AV_ARGS)
    assert len(train) == 2000 and len(test) == 1000 and train.groups == clean.groups
    assert torch.equal(train.targets, clean.targets)
    variance = lambda x: x.flatten(1).var(0).sum()
    assert 0.15 < variance(train.inputs["image"]) / variance(clean.inputs["image"]) < 0.25
    means = torch.stack([train.inputs["image"][train.targets == d].flatten(1).mean(0) for d in range(10)])
    accuracy = (torch.cdist(test.inputs["image"].flatten(1), means).argmin(1) == test.targets).float().mean()
    assert 0.3 < accuracy < 0.9  # weaker than the clean images' nearest class mean, far above chance


@needs_data
def test_three_test_speakers_leave_two_training_voices_and_hold_out_the_third():
    # experiments/avdigits_three_speakers_naive.yaml, the benchmark where naive fusion falls below image
    # alone: the audio encoder trains on two voices, held-out selection sees a third, test three more.
    from pathlib import Path
    from blendtune.config import load_config
    from blendtune.build import build_data
    experiment = Path(__file__).resolve().parents[1] / "experiments" / "avdigits_three_speakers_naive.yaml"
    for seed in (0, 1):
        splits = build_data(load_config(str(experiment), [f"seed={seed}"]))
        train, held, test = (set(s.groups) for s in (splits.train, splits.held_out, splits.test))
        assert test == {"george", "jackson", "lucas"} and len(train) == 2 and len(held) == 1
        assert not train & held and (train | held) == {"nicolas", "theo", "yweweler"}
        assert len(splits.train) == 1000 and len(splits.held_out) == 500 and len(splits.test) == 1500

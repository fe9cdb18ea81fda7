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

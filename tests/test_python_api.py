"""The Python API as a researcher uses it (issue 22): a fit is a run (its folder, resume, load, predict),
PyTorch's data contract (optional test, collate_fn, sampler, a fusion of one's own), early stopping and
keep-best on held-out data, errors in the caller's words, and compare / sweep on in-memory objects."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import blendtune
from blendtune.errors import UserError
from blendtune.loggers import read_metrics
from conftest import REPO, assert_wandb_matches_metrics, cli_in_process, wandb_history

sys.path.insert(0, str(REPO / "examples"))
from my_av import ClipDataset, TwoStreamNet, make_data  # noqa: E402

QUIET = {"progress": False, "lr": 1e-3, "optimizer": "adam"}


@pytest.fixture(scope="module")
def data():
    return make_data(num_train=240, num_test=120)


def test_a_fit_with_run_dir_is_a_run_that_resumes_exactly_and_loads_back(data, tmp_path, capsys):
    train, test = data
    straight = blendtune.fit(TwoStreamNet, train, test, strategy="ogm_ge", epochs=3, alpha=0.8, run_dir=tmp_path / "straight",
                             **QUIET)
    first = blendtune.fit(TwoStreamNet, train, test, strategy="ogm_ge", epochs=2, alpha=0.8, run_dir=tmp_path / "split", **QUIET)
    assert first.metrics["epoch"] == 2
    resumed = blendtune.fit(TwoStreamNet, train, test, resume=tmp_path / "split", epochs=3, progress=False)
    # the folder `blendtune train` writes: config, metrics.jsonl, the W&B offline run, model.json, checkpoints
    run = tmp_path / "split"
    for name in ("config.yaml", "metrics.jsonl", "model.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert_wandb_matches_metrics(wandb_history(run), rows)
    # resuming continues the same run bit for bit
    for key in ("acc/test/fused", "loss/held_out/fused", "ogm/coeff/video"):
        assert resumed.metrics[key] == straight.metrics[key], key
    # the trained model back from its folder, into the user's own module, predicting as the run did
    loaded = blendtune.load(run, model=TwoStreamNet)
    x = {"audio": test.audio[:50], "video": test.video[:50]}
    assert torch.equal(loaded.predict(x).probabilities, resumed.predict(x).probabilities)
    mine = TwoStreamNet()
    mine.load_state_dict(loaded.backbone_state_dict())  # no key surgery: strict, the backbone's own keys
    assert torch.equal(mine.video[0].weight, resumed.model.encoders.video[0].weight.cpu())
    predictions = loaded.predict(test)
    accuracy = (predictions.classes == test.targets).float().mean().item()
    assert predictions.head == "fused" and accuracy == pytest.approx(resumed.metrics["acc/test/fused"], abs=1e-6)
    assert predictions.probabilities.shape == (len(test), 4)
    # `blendtune report` reads a single run's folder too
    proc = cli_in_process(capsys, "report", run)
    assert proc.returncode == 0 and "| ogm_ge | 1 | 1 | 3 |" in proc.stdout, proc.stderr[-1500:]
    # the CLI cannot rebuild Python objects: it says where to resume instead, and changes nothing
    before = (run / "config.yaml").read_text()
    proc = cli_in_process(capsys, "train", "--resume", run, "train.epochs=4")
    assert proc.returncode == 2 and "blendtune.fit(resume=run_dir" in proc.stderr and "Traceback" not in proc.stderr
    assert len(read_metrics(run / "metrics.jsonl")) == 3
    assert before.replace("epochs: 3", "epochs: 4") == (run / "config.yaml").read_text() or \
        before == (run / "config.yaml").read_text()
    with pytest.raises(UserError, match="is a run already"):
        blendtune.fit(TwoStreamNet, train, test, run_dir=run, **QUIET)
    with pytest.raises(UserError, match=r"^fit\(\): resume=.*: strategy cannot change when resuming"):
        blendtune.fit(TwoStreamNet, train, test, resume=run, epochs=4, config={"strategy": "naive"}, progress=False)
    # fit trains a copy of a model instance: two fits of one instance each keep their own trained model
    net = TwoStreamNet()
    one = blendtune.fit(net, train, test, epochs=1, **QUIET)
    before = one.predict(x).probabilities
    blendtune.fit(net, train, test, epochs=2, **QUIET)
    assert torch.equal(one.predict(x).probabilities, before) and one.model.encoders is not net


def test_early_stopping_and_keep_best_watch_held_out_data(data, tmp_path):
    train, test = data
    result = blendtune.fit(TwoStreamNet, train, test, strategy="naive", epochs=30, early_stopping_patience=2, keep_best=True, lr=0.05,
                           optimizer="sgd", monitor="loss/held_out/fused", progress=False, run_dir=tmp_path / "run")
    history = result.history
    assert len(history) < 30 and history[-1]["stopped_early"] == 1.0  # stopped: two epochs without a better loss
    losses = [r["loss/held_out/fused"] for r in history]
    best = min(range(len(losses)), key=losses.__getitem__) + 1
    assert result.best_epoch == best and history[-1]["epoch"] - best == 2
    # the model ends with the best epoch's weights: its held-out loss is the best one, not the last
    again = result.trainer.evaluate(result.model).metrics()["loss/held_out/fused"]
    assert again == pytest.approx(losses[best - 1], rel=1e-5) and again < losses[-1]
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert blendtune.load(tmp_path / "run", model=TwoStreamNet).weights_epoch == best
    assert blendtune.load(tmp_path / "run", model=TwoStreamNet, checkpoint="last").weights_epoch == history[-1]["epoch"]
    assert blendtune.load(tmp_path / "run", model=TwoStreamNet).predict(test).classes.tolist() == \
        result.predict(test).classes.tolist()
    # resumed after the best epoch, the run stops where the uninterrupted one did, with the same best weights
    settings = dict(strategy="naive", early_stopping_patience=2, keep_best=True, lr=0.05, optimizer="sgd",
                    monitor="loss/held_out/fused", progress=False)
    blendtune.fit(TwoStreamNet, train, test, epochs=best + 1, run_dir=tmp_path / "split", **settings)
    resumed = blendtune.fit(TwoStreamNet, train, test, resume=tmp_path / "split", epochs=30, progress=False)
    assert resumed.history[-1]["epoch"] == history[-1]["epoch"] and resumed.best_epoch == best
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), result.model.state_dict().values()))
    with pytest.raises(UserError, match=r"fit\(monitor=\.\.\.\): selection looks at held-out data only"):
        blendtune.fit(TwoStreamNet, train, test, early_stopping_patience=2, monitor="acc/test/fused", **QUIET)


def test_the_test_split_is_evaluated_every_test_every_epochs_and_never_handed_to_a_strategy(data, monkeypatch):
    from blendtune.strategies.naive import Naive
    handed = []
    monkeypatch.setattr(Naive, "on_epoch_end", lambda self, epoch, evaluation, context:
                        handed.append(sorted(evaluation.splits)), raising=False)
    train, test = data
    result = blendtune.fit(TwoStreamNet, train, test, strategy="naive", epochs=5, test_every=2, **QUIET)
    assert [r["epoch"] for r in result.history if "acc/test/fused" in r] == [2, 4, 5]  # and always the last
    assert all("acc/test/prediction" in r for r in result.history if "acc/test/fused" in r)
    assert handed == [["held_out", "train"]] * 6  # epoch 0's measurement and five epochs: never test
    # evaluating the test split or not leaves training exactly as it was (modality dropout draws from torch's RNG)
    runs = [blendtune.fit(TwoStreamNet, train, test, strategy="modality_dropout", epochs=3, test_every=every, seed=3,
                          **QUIET) for every in (1, 3)]
    assert [r["loss/objective"] for r in runs[0].history] == [r["loss/objective"] for r in runs[1].history]
    assert all(torch.equal(a, b) for a, b in zip(*(r.model.state_dict().values() for r in runs)))
    # an early stop is a last epoch too
    stopped = blendtune.fit(TwoStreamNet, train, test, strategy="naive", epochs=30, test_every=100, lr=0.05,
                            optimizer="sgd", early_stopping_patience=1, monitor="loss/held_out/fused", progress=False)
    assert stopped.history[-1].get("stopped_early") == 1.0 and "acc/test/fused" in stopped.history[-1]
    assert not any("acc/test/fused" in r for r in stopped.history[:-1])


def test_test_data_is_optional(data):
    train, _ = data
    result = blendtune.fit(TwoStreamNet(), train, strategy="gblend", epochs=1, super_epoch=1, **QUIET)
    assert "acc/held_out/fused" in result.metrics and not any("/test/" in k for k in result.metrics)


def test_a_unimodal_run_predicts_with_its_one_trained_head(data):
    """The fused head of a uni-modal run is untrained: the logged prediction, early stopping's default
    monitor and `predict` all use the modality's head, whatever train.predict says."""
    train, test = data
    for predict in ("fused", "ensemble"):
        result = blendtune.fit(TwoStreamNet(), train, test, strategy="unimodal", modality="video", predict=predict,
                               epochs=3, **QUIET)
        metrics = result.metrics
        assert metrics["acc/test/prediction"] == metrics["acc/test/video"] > 0.5 > metrics["acc/test/fused"]
        assert metrics["prediction/video"] == 1.0 and result.prediction_head() == "video"
        classes = result.predict(test).classes
        assert (classes == torch.as_tensor(test.targets)).float().mean().item() == pytest.approx(metrics["acc/test/video"])


class VariableLengthClips(torch.utils.data.Dataset):
    """Audio clips of different lengths, as a folder of recordings gives them."""

    def __init__(self, base: ClipDataset):
        self.base = base
        self.targets = base.targets

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        inputs, target = self.base[i]
        return {"audio": inputs["audio"][:, : 40 + (i * 7) % 24], "video": inputs["video"]}, target


def pad_audio(items):
    """A padding collate: clips zero-padded to the longest of the batch."""
    inputs, targets = zip(*items)
    longest = max(x["audio"].shape[-1] for x in inputs)
    audio = torch.stack([nn.functional.pad(x["audio"], (0, longest - x["audio"].shape[-1])) for x in inputs])
    return {"audio": audio, "video": torch.stack([x["video"] for x in inputs])}, torch.as_tensor(targets)


def test_variable_length_audio_trains_with_a_padding_collate_and_a_sampler(data):
    train, test = (VariableLengthClips(d) for d in data)
    with pytest.raises(UserError, match=r"train\[1\]: inputs of shape .* pass collate_fn="):
        blendtune.fit(TwoStreamNet(), train, test, epochs=1, **QUIET)  # torch's default collate cannot batch them
    drawn = []

    class CountingSampler(torch.utils.data.RandomSampler):
        def __iter__(self):
            drawn.append(1)
            return super().__iter__()

    result = blendtune.fit(TwoStreamNet(), train, test, strategy="ogm_ge", epochs=2, alpha=0.8, collate_fn=pad_audio,
                           sampler=CountingSampler(range(216)), held_out_ratio=0.1, **QUIET)
    assert result.metrics["acc/test/fused"] > 0.5 and len(drawn) == 2  # the user's sampler ordered each epoch
    assert result.predict(test).classes.shape == (len(test),)  # predict batches with the run's collate too
    with pytest.raises(UserError, match="loader_options: 'shuffle' is set by blendtune; pass sampler= instead"):
        blendtune.fit(TwoStreamNet(), train, test, collate_fn=pad_audio, loader_options={"shuffle": True}, **QUIET)


class BilinearFusion(nn.Module):
    """A fusion of the user's own: a bilinear score of the two streams plus each stream's linear share."""

    def __init__(self, dims, num_classes):
        super().__init__()
        self.audio = nn.Linear(dims["audio"], num_classes)
        self.video = nn.Linear(dims["video"], num_classes)
        self.bilinear = nn.Bilinear(dims["audio"], dims["video"], num_classes)

    def forward(self, feats):
        return self.audio(feats["audio"]) + self.video(feats["video"]) + self.bilinear(feats["audio"], feats["video"])

    def unimodal_logits(self, feats):  # each modality's share of the classifier: what OGM scores
        return {"audio": self.audio(feats["audio"]), "video": self.video(feats["video"])}


class NoSharesFusion(BilinearFusion):
    unimodal_logits = None


def test_a_fusion_of_ones_own_works_and_is_refused_where_ogm_cannot_score_it(data):
    train, test = data
    result = blendtune.fit(TwoStreamNet(), train, test, strategy="ogm_ge", fusion=BilinearFusion, epochs=2, alpha=0.8, **QUIET)
    assert isinstance(result.model.fusion, BilinearFusion) and result.metrics["acc/test/fused"] > 0.5
    assert result.metrics["ogm/coeff/video"] < 1.0  # video dominates: its coefficient is below 1

    class Plain(nn.Module):
        def __init__(self, dims, num_classes):
            super().__init__()
            self.fc = nn.Linear(sum(dims.values()), num_classes)

        def forward(self, feats):
            return self.fc(torch.cat(list(feats.values()), dim=1))
    assert blendtune.fit(TwoStreamNet(), train, test, strategy="naive", fusion=Plain, epochs=1, **QUIET).metrics
    with pytest.raises(UserError, match=r"fit\(fusion=\.\.\.\): OGM scores .* needs unimodal_logits"):
        blendtune.fit(TwoStreamNet(), train, test, strategy="ogm", fusion=Plain, epochs=1, **QUIET)
    with pytest.raises(UserError, match=r"expected \(batch, num_classes\) = \(2, 4\) logits"):
        blendtune.fit(TwoStreamNet(), train, test, fusion=lambda dims, num_classes: _WrongShape(), epochs=1, **QUIET)


class _WrongShape(nn.Module):
    def forward(self, feats):
        return feats["audio"]


def test_errors_speak_the_python_callers_language(data):
    train, test = data
    with pytest.raises(UserError, match=r"^fit\(batch_size=\.\.\.\): expected a positive number, got 0$"):
        blendtune.fit(TwoStreamNet(), train, test, batch_size=0)
    with pytest.raises(UserError, match=r"fit\(p=\.\.\.\): expected 0 <= p < 1"):
        blendtune.fit(TwoStreamNet(), train, test, strategy="modality_dropout", p=1.5)
    with pytest.raises(UserError, match=r"momentum= could mean optim.momentum or pmr.momentum; pass config="):
        blendtune.fit(TwoStreamNet(), train, test, strategy="pmr", momentum=0.5)
    with pytest.raises(UserError, match=r"fit\(held_out_ratio=\.\.\.\): gblend needs a held-out split: held_out_ratio= > 0"):
        blendtune.fit(TwoStreamNet(), train, test, strategy="gblend", held_out_ratio=0.0)
    with pytest.raises(UserError, match=r"fit\(workers=\.\.\.\): a run on several Ray workers needs run_dir="):
        blendtune.fit(TwoStreamNet(), train, test, workers=2)
    # and the same rule, met from YAML, names the config key
    from blendtune.config import load_config
    with pytest.raises(UserError, match=r"^config key 'data.batch_size': expected a positive number, got 0$"):
        load_config(None, ["data.batch_size=0"])
    result = blendtune.fit(TwoStreamNet(), train, test, strategy="pmr", config={"pmr.momentum": 0.5}, epochs=1, **QUIET)
    assert result.config.pmr.momentum == 0.5 and result.config.optim.momentum == 0.9


class ConvNet(nn.Module):
    """An image stream that flattens its conv output with `.view` (written for NCHW, as many are) or with
    `.flatten`, which works in any memory layout."""

    def __init__(self, flatten_with_view: bool):
        super().__init__()
        self.conv, self.image = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4 * 6 * 6, 16)
        self.audio = nn.Linear(8, 16)
        self.flatten_with_view = flatten_with_view

    def forward(self, inputs):
        x = torch.relu(self.conv(inputs["image"]))
        x = x.view(len(x), -1) if self.flatten_with_view else x.flatten(1)
        return {"image": self.image(x), "audio": self.audio(inputs["audio"])}


def test_conv_models_run_channels_last_on_cpu_and_a_view_that_needs_nchw_is_one_line():
    g = torch.Generator().manual_seed(0)
    items = [({"image": torch.randn(2, 6, 6, generator=g) + (i % 2), "audio": torch.randn(8, generator=g)}, i % 2)
             for i in range(64)]
    with pytest.raises(UserError, match=r"^fit\(channels_last=\.\.\.\): the model calls \.view\(\) on a conv output"):
        blendtune.fit(ConvNet(flatten_with_view=True), items[:48], items[48:], epochs=1, **QUIET)
    torch.manual_seed(0)
    nchw = blendtune.fit(ConvNet(flatten_with_view=True), items[:48], items[48:], epochs=2, channels_last=False, **QUIET)
    assert not nchw.model.encoders.conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    nhwc = blendtune.fit(ConvNet(flatten_with_view=False), items[:48], items[48:], epochs=2, **QUIET)  # the default on CPU
    assert nhwc.model.encoders.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc.metrics["loss/objective"] == pytest.approx(nchw.metrics["loss/objective"], rel=1e-4)  # same math


@pytest.fixture(scope="module")
def ray_session():
    import ray
    from blendtune.launch import RAY_ENV, worker_env
    import os
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": worker_env(True)})
    yield
    ray.shutdown()


def test_compare_and_sweep_run_on_in_memory_objects(data, tmp_path, ray_session):
    train, test = make_data(num_train=160, num_test=80)
    table = blendtune.compare(model=TwoStreamNet, train=train, test=test, strategies=["naive", "ogm_ge:alpha=0.8"],
                              seeds=2, epochs=2, batch_size=32, lr=1e-3, optimizer="adam", wandb=False,
                              output_dir=str(tmp_path))
    assert "| naive | 2 | 2 | 2 |" in table.report and "| ogm_ge:alpha=0.8 | 2 | 2 | 2 |" in table.report
    fused = [float(r["final_acc_fused"]) for r in table.rows]
    assert len(fused) == 4 and sum(fused) / 4 > 0.35  # 4 classes: chance is 0.25
    # the same report as the CLI writes, from the folder
    assert (table.run_dir / "report.md").read_text() == table.report
    # seeds initialise their own weights (a class was passed): the two naive trials differ
    naive = [r for r in table.rows if r["strategy"] == "naive"]
    assert naive[0]["final_acc_fused"] != naive[1]["final_acc_fused"] or naive[0]["best_acc_fused"] != naive[1]["best_acc_fused"]
    run_dir, results = blendtune.sweep({"optim.lr": {"grid": [1e-3, 3e-3]}}, model=TwoStreamNet, train=train,
                                       test=test, strategy="ogm_ge", alpha=0.5, epochs=1, batch_size=32,
                                       optimizer="adam", search="grid", scheduler="none", wandb=False,
                                       output_dir=str(tmp_path))
    assert len(results) == 2 and not any(r.error for r in results)
    assert sorted(r.config["optim.lr"] for r in results) == [1e-3, 3e-3]
    assert all(r.metrics["acc/held_out/fused"] > 0.3 and "ogm/coeff/video" in r.metrics for r in results)


@pytest.mark.slow
def test_fit_on_two_ray_train_workers_ships_the_objects_and_returns_the_trained_model(data, tmp_path):
    train, test = data
    result = blendtune.fit(TwoStreamNet, train, test, strategy="ogm_ge", alpha=0.8, epochs=2, workers=2,
                           batch_size=32, run_dir=tmp_path / "ddp", **QUIET)
    rows = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and result.metrics == rows[-1]
    assert result.metrics["acc/test/fused"] > 0.5 and result.metrics["ogm/coeff/video"] < 1.0
    accuracy = (result.predict(test).classes == test.targets).float().mean().item()
    assert accuracy == pytest.approx(result.metrics["acc/test/fused"], abs=1e-6)


def test_errors_raised_in_ray_workers_reach_the_driver_whole():
    """Ray pickles a worker's exception to the driver: blendtune's errors keep their key and message, and the
    one line the CLI prints is that message, not the last line of Ray's wrapper."""
    import pickle
    from blendtune.errors import OptionError, SettingError
    from blendtune.launch import worker_error_line
    error = pickle.loads(pickle.dumps(SettingError("data.batch_size", "the global batch 63 must be divisible")))
    assert (error.key, error.message) == ("data.batch_size", "the global batch 63 must be divisible")
    assert str(pickle.loads(pickle.dumps(OptionError("p", "expected 0 <= p < 1")))) == "option 'p': expected 0 <= p < 1"
    wrapped = ("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
               "  File \"x.py\", line 1, in run\nblendtune.errors.SettingError: config key 'data.batch_size': the "
               "global batch 63 must be divisible by the 2 workers\n\n[Rank 1 Error Snippet]: ...")
    assert worker_error_line(RuntimeError(wrapped)) == \
        "config key 'data.batch_size': the global batch 63 must be divisible by the 2 workers"


@pytest.mark.slow
def test_a_rule_checked_in_the_ray_train_workers_is_one_line_at_the_driver(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "blendtune.cli", "train", "experiments/synthetic_naive.yaml",
                           "workers=2", "sweep.cpus_per_worker=0.5", "data.batch_size=63", "max_failures=0",
                           "wandb=false", f"output_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config key 'data.batch_size': the global batch 63 must be divisible by the 2 workers" in proc.stderr

"""Configs: strict keys and types, every shipped YAML validates, search spaces are checked."""
from pathlib import Path

import pytest

from blendtune.config import load_config
from blendtune.errors import UserError
from blendtune.search_space import load_search_space, parse_space, validate_space

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_validates_and_starts_with_its_command(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert path.read_text().startswith("# ") and f"blendtune train experiments/{path.name}" in path.read_text().splitlines()[0]


# The papers' strategies and the baselines ship a YAML on both built-in datasets; a new strategy needs
# none to be covered (its settings row in test_strategies.py is enough).
SHIPPED_STRATEGIES = {"naive", "unimodal", "modality_dropout", "gblend", "ogm", "ogm_ge", "mmpareto", "pmr", "mla"}
SHIPPED_STRATEGIES |= {"agm"}
SHIPPED_STRATEGIES |= {"ume", "umt"}


def test_experiments_cover_the_shipped_strategies_on_both_datasets():
    from blendtune.strategies import STRATEGIES
    assert SHIPPED_STRATEGIES <= set(STRATEGIES.names())
    configs = [load_config(p) for p in EXPERIMENTS]
    for dataset in ("synthetic", "avdigits"):
        used = {cfg.strategy for cfg in configs if cfg.data.dataset == dataset}
        assert used == SHIPPED_STRATEGIES


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_no_shipped_experiment_sets_keys_its_strategy_ignores(path):
    from blendtune.config import check_keys_are_used
    check_keys_are_used(load_config(path))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_search_space_validates(path):
    space = load_search_space(path)
    validate_space(space, source=str(path))
    assert path.read_text().startswith("# blendtune sweep")


def test_unknown_key_is_named_with_valid_alternatives():
    with pytest.raises(UserError, match=r"unknown config key 'optim.lrr'.*valid keys under 'optim': name, lr"):
        load_config(None, ["optim.lrr=0.1"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown config key 'train.epoch'"):
        load_config(bad)


def test_wrong_type_is_an_error():
    with pytest.raises(UserError, match=r"config key 'optim.lr'.*abc"):
        load_config(None, ["optim.lr=abc"])
    with pytest.raises(UserError, match=r"config key 'train.epochs'"):
        load_config(None, ["train.epochs=2.5"])


def test_choices_and_registry_names_are_checked():
    with pytest.raises(UserError, match=r"'strategy': expected one of .*gblend.*got 'gblendd'"):
        load_config(None, ["strategy=gblendd"])
    with pytest.raises(UserError, match=r"'gblend.estimator'"):
        load_config(None, ["gblend.estimator=magic"])
    with pytest.raises(UserError, match=r"model.encoders.audio.name"):
        load_config(None, ["model.encoders.audio.name=vit"])
    with pytest.raises(UserError, match=r"expected key=value"):
        load_config(None, ["optim.lr"])


def test_overrides_apply_with_types():
    cfg = load_config(None, ["optim.lr=0.5", "gblend.super_epoch=3", "data.avdigits.test_speakers=[theo]"])
    assert cfg.optim.lr == 0.5 and cfg.gblend.super_epoch == 3 and cfg.data.avdigits.test_speakers == ["theo"]


def test_search_space_errors():
    with pytest.raises(UserError, match="not a config key"):
        validate_space(parse_space({"optim.learning_rate": {"uniform": [0.1, 0.2]}}, "s"))
    with pytest.raises(UserError, match="low < high"):
        parse_space({"optim.lr": {"uniform": [0.2, 0.1]}}, "s")
    with pytest.raises(UserError, match="not valid"):
        validate_space(parse_space({"gblend.super_epoch": {"choice": [1, "two"]}}, "s"))
    with pytest.raises(UserError, match="expected one of"):
        parse_space({"optim.lr": {"normal": [0, 1]}}, "s")


def test_amp_choices_survive_yaml_parsing_of_the_command_line():
    assert load_config(None, ["train.amp=fp32"]).train.amp == "fp32"
    with pytest.raises(UserError, match="train.amp"):
        load_config(None, ["train.amp=off"])  # YAML reads off as false: named, not silently wrong


def test_worker_cpus_split_the_machine_for_one_run_and_default_to_one_in_sweeps():
    from blendtune.launch import worker_cpus
    cfg = load_config(None, ["workers=2"])
    assert worker_cpus(cfg) == 1.0                       # a sweep: many trials share the CPUs
    assert worker_cpus(cfg, [16.0]) == 8.0               # one `train workers=2` run on a 16-core machine
    assert worker_cpus(cfg, [2.0]) == 1.0
    assert worker_cpus(load_config(None, ["workers=4"]), [8.0, 8.0]) == 4.0
    assert worker_cpus(load_config(None, ["workers=2"]), [8.0, 8.0, 8.0]) == 8.0  # at most one node's worth
    assert worker_cpus(load_config(None, ["workers=2", "sweep.cpus_per_worker=0.5"]), [16.0]) == 0.5
    with pytest.raises(UserError, match="sweep.cpus_per_worker"):
        load_config(None, ["sweep.cpus_per_worker=0"])


def test_relative_data_roots_reach_ray_trials_as_absolute_paths(tmp_path, monkeypatch):
    """Ray runs every trial in its own directory: `data.root=../data` or a relative
    $BLENDTUNE_DATA_ROOT must still name the folder the user meant."""
    from blendtune.launch import worker_env
    (tmp_path / "data").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    cfg = load_config(None, ["data.root=../data"])
    assert Path(cfg.data.root).is_absolute() and Path(cfg.data.root).resolve() == (tmp_path / "data").resolve()
    monkeypatch.setenv("BLENDTUNE_DATA_ROOT", "../data")
    root = Path(worker_env(local=True)["BLENDTUNE_DATA_ROOT"])
    assert root.is_absolute() and root.resolve() == (tmp_path / "data").resolve()
    assert load_config(None, ["data.root=s3://bucket/data"]).data.root == "s3://bucket/data"


def test_a_continuous_distribution_on_an_integer_key_is_refused_with_the_fix():
    # uniform: [4, 12] looks like whole numbers, but Tune draws 7.31: each trial would fail on its own
    with pytest.raises(UserError, match=r"key 'train.epochs' takes whole numbers; uniform draws fractions: use "
                                        r"\{randint: \[4, 13\]\}"):
        validate_space(parse_space({"train.epochs": {"uniform": [4, 12]}}, "space"))
    validate_space(parse_space({"train.epochs": {"randint": [4, 13]}, "optim.lr": {"uniform": [0.01, 0.1]}}, "space"))

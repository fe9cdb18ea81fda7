"""The comparison's statistics: 95% confidence intervals and paired differences to naive."""
import math

import pytest

from blendtune.report import mean_ci, paired_differences


def test_mean_ci_is_students_t_interval():
    mean, half = mean_ci([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-4)  # t(0.975, 2) * s / sqrt(n)
    assert mean_ci([0.5, 0.5, 0.5, 0.5, 0.5]) == (0.5, 0.0)
    assert math.isinf(mean_ci([0.7])[1])


def test_paired_differences_pair_by_seed_and_mark_clear_wins():
    scores = {"naive": {0: 0.70, 1: 0.72, 2: 0.71, 3: 0.69, 4: 0.70},
              "gblend": {0: 0.75, 1: 0.76, 2: 0.74, 3: 0.75, 4: 0.76},   # +5 points on every seed
              "ogm_ge": {0: 0.72, 1: 0.70, 2: 0.71, 3: 0.70, 4: 0.69},   # noise around naive
              "late": {3: 0.90}}                                           # one shared seed: no interval
    by_label = {d.label: d for d in paired_differences(scores)}
    assert set(by_label) == {"gblend", "ogm_ge", "late"}
    g = by_label["gblend"]
    assert g.seeds == 5 and g.wins == 5 and g.mean == pytest.approx(0.048) and g.excludes_zero
    o = by_label["ogm_ge"]
    assert o.mean == pytest.approx(0.0) and not o.excludes_zero and o.wins == 2
    assert by_label["late"].seeds == 1 and not by_label["late"].excludes_zero


def test_prediction_head_is_chosen_on_held_out_data_never_on_test():
    from blendtune.evaluation import Evaluation, HeadStats, prediction_head, prediction_metrics
    ev = Evaluation({
        "held_out": {"a": HeadStats(1.0, acc=0.60), "b": HeadStats(1.0, acc=0.50), "fused": HeadStats(1.0, acc=0.70),
                     "ensemble": HeadStats(1.0, acc=0.75)},
        "test": {"a": HeadStats(1.0, acc=0.90), "b": HeadStats(1.0, acc=0.40), "fused": HeadStats(1.0, acc=0.72),
                 "ensemble": HeadStats(1.0, acc=0.71)}})
    assert prediction_head(ev, "fused", ["a", "b"]) == "fused"
    assert prediction_head(ev, "held_out_best", ["a", "b"]) == "ensemble"   # 'a' is best on test: not looked at
    m = prediction_metrics(ev, "ensemble", ["a", "b"])
    assert m["acc/test/prediction"] == 0.71 and m["acc/held_out/prediction"] == 0.75
    assert m["prediction/ensemble"] == 1.0 and m["prediction/fused"] == 0.0


def test_train_predict_reports_the_prediction_head_every_epoch():
    from blendtune.config import load_config
    from blendtune.build import build_trainer
    from conftest import TINY
    trainer = build_trainer(load_config(None, TINY + ["train.predict=held_out_best"]))
    m = trainer.fit()
    chosen = [h for h in ("fused", "ensemble", "clean", "memorizable") if m[f"prediction/{h}"] == 1.0]
    assert len(chosen) == 1 and m["acc/test/prediction"] == m[f"acc/test/{chosen[0]}"]
    assert m["acc/held_out/prediction"] == max(m[f"acc/held_out/{h}"] for h in ("fused", "ensemble", "clean", "memorizable"))


def test_compare_variants_carry_options_and_are_labelled_as_written():
    from blendtune.comparisons import strategy_variants
    from blendtune.config import load_config, with_overrides
    from blendtune.errors import UserError
    from blendtune.report import strategy_label
    text = "naive,gblend,gblend:ema=0.5:floor=0.05,gblend:optim.lr=0.01,unimodal:audio"
    variants = strategy_variants(text)
    assert variants[2] == {"strategy": "gblend", "gblend.ema": 0.5, "gblend.floor": 0.05}
    assert variants[3] == {"strategy": "gblend", "optim.lr": 0.01}
    assert strategy_variants("mla:optim.lr=3e-4")[0]["optim.lr"] == 3e-4  # read as the command line reads it
    assert variants[4] == {"strategy": "unimodal", "unimodal.modality": "audio"}
    base = load_config(None, ["data.dataset=avdigits"])
    labels = [strategy_label(with_overrides(base, v), v) for v in variants]
    assert labels == text.split(",")
    assert with_overrides(base, variants[2]).gblend.ema == 0.5
    # ogm_ge's options live in the ogm section; a label names the variant's strategy even where its options fail
    (ogm_ge,) = strategy_variants("ogm_ge:alpha=0.8")
    assert ogm_ge == {"strategy": "ogm_ge", "ogm.alpha": 0.8} and strategy_label(with_overrides(base, ogm_ge), ogm_ge) == \
        "ogm_ge:alpha=0.8"
    assert strategy_label(base, {"strategy": "gblend", "gblend.emaa": 0.5}) == "gblend:emaa=0.5"
    for bad, message in (("gblend:ema", "expected KEY=VALUE"), ("unimodal", "unimodal:MODALITY"),
                         ("naive,naive", "given twice"), ("nope:x=1", "unknown strategy"),
                         ("gblend:ema=0.5:ema=0.6", "sets gblend.ema twice"), ("gblend:ema=[1", "--strategies")):
        with pytest.raises(UserError, match=message):
            strategy_variants(bad)


def test_compare_refuses_variants_that_would_share_a_row_before_starting_ray(tmp_path, capfd):
    from conftest import cli_in_process
    proc = cli_in_process(capfd, "compare", "experiments/synthetic_gblend.yaml",
                          "--strategies", "gblend:super_epoch=1,gblend:super_epoch='1'", f"output_dir={tmp_path}")
    assert proc.returncode == 2 and "would be one row" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = cli_in_process(capfd, "compare", "experiments/synthetic_gblend.yaml",
                          "--strategies", "naive,gblend:nope=1", f"output_dir={tmp_path}")
    assert proc.returncode == 2 and "--strategies: gblend:nope=1: 'gblend.nope' is not a config key" in proc.stderr
    assert not any(tmp_path.iterdir())

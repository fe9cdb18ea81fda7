"""Comparisons and sweeps as functions: `blendtune.compare(...)` and `blendtune.sweep(...)` from Python,
on a YAML experiment or on the user's own model and data objects; `blendtune compare` is a thin layer
over `compare`.

    table = blendtune.compare(model=MyAV, train=train_ds, test=test_ds, strategies=["naive", "ogm_ge"],
                              seeds=5, epochs=10, lr=1e-3, optimizer="adam")
    print(table.report)                     # the report `blendtune compare` prints; table.rows per trial

A comparison is one Tune sweep: a grid of strategy variants x seeds, no scheduler, one trial per point;
the report gives each strategy's mean and 95% CI over seeds and paired differences to naive.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from blendtune.build import PYTHON_OBJECTS, UserParts
from blendtune.config import (ExperimentConfig, TrialConfig, in_python_terms, keyword_overrides,
                              load_config, override_value, with_overrides)
from blendtune.errors import UserError
from blendtune.report import strategy_label, write_report
from blendtune.runs import create_sweep_dir, load_sweep
from blendtune.search_space import load_search_space, parse_space
from blendtune.strategies import STRATEGIES
from blendtune.sweeps import Distribution, run_sweep


class Comparison(NamedTuple):
    """A finished comparison: its folder, the report (markdown, as `blendtune compare` prints it), one
    row per trial (results.csv) and Tune's ResultGrid."""
    run_dir: Path
    report: str
    rows: list[dict]
    results: Any


class SweepResult(NamedTuple):
    """A sweep's folder and Tune's ResultGrid (`run_dir, results = blendtune.sweep(...)`)."""
    run_dir: Path
    results: Any

    def best(self, metric: str | None = None, mode: str | None = None) -> dict:
        """The best trial's config and last metrics by `metric` (default: the sweep's, on held-out data)."""
        s = load_config(self.run_dir / "config.yaml").sweep
        result = self.results.get_best_result(metric=metric or s.metric, mode=mode or s.mode, scope="all")
        return {"config": result.config, "metrics": dict(result.metrics or {})}


def strategy_variants(strategies: str | Sequence[str]) -> list[dict]:
    """`naive,gblend,gblend:ema=0.5:floor=0.05,unimodal:audio` (or a list of those items) -> one config
    variant each. After the strategy, `key=value` sets an option (a bare key is the strategy's own: `ema`
    is `gblend.ema`; a dotted one any key: `optim.lr=0.01`; no lists: commas separate variants);
    unimodal takes its modality bare."""
    items = strategies.split(",") if isinstance(strategies, str) else list(strategies)
    variants = []
    for item in filter(None, (part.strip() for part in items)):
        name, *options = item.split(":")
        if name not in STRATEGIES:
            raise UserError(f"--strategies: unknown strategy {name!r}; expected {', '.join(STRATEGIES.names())}")
        variant = {"strategy": name}
        for option in options:
            key, equals, value = option.partition("=")
            if not equals:
                if name != "unimodal" or "unimodal.modality" in variant:
                    raise UserError(f"--strategies: {item!r}: expected KEY=VALUE after the strategy, got {option!r}")
                key, value = "unimodal.modality", option
            else:
                section = STRATEGIES.section(name) or name  # ogm_ge's options live in the ogm section
                key, value = (key if "." in key else f"{section}.{key}"), override_value(value, f"--strategies: {item!r}")
            if key in variant:
                raise UserError(f"--strategies: {item!r} sets {key} twice")
            variant[key] = value
        if name == "unimodal" and "unimodal.modality" not in variant:
            raise UserError("--strategies: write unimodal:MODALITY, e.g. unimodal:audio")
        if variant in variants:
            raise UserError(f"--strategies: {item!r} is given twice")
        variants.append(variant)
    if not variants:
        raise UserError("--strategies: give at least one strategy")
    return variants


def new_comparison(cfg: ExperimentConfig, variants: list[dict], seeds: int, tune: int = 0,
                   spaces: Mapping[str, Any] | None = None) -> tuple[Path, ExperimentConfig, dict]:
    """The comparison's folder, config (a grid, no scheduler, one trial per point) and space, after
    every check: each variant's config validates and gives its own report row. With `tune` = N, each
    variant is an arm tuned at an equal budget first (blendtune.tuning): its space and metric recorded."""
    if seeds < 1:
        raise UserError("--seeds: expected at least 1")
    if tune < 0:
        raise UserError("--tune: expected the number of trials per strategy (0: no tuning)")
    cfg = with_overrides(cfg, {"sweep.search": "grid", "sweep.scheduler": "none", "sweep.num_samples": 1})
    labels = []
    for variant in variants:  # fail before starting Ray, not inside a trial
        try:
            labels.append(strategy_label(with_overrides(cfg, variant), variant))
        except UserError as e:
            raise UserError(f"--strategies: {strategy_label(cfg, variant)}: {e}") from None
    if len(set(labels)) < len(labels):  # the report groups trials by label
        raise UserError(f"--strategies: {sorted({l for l in labels if labels.count(l) > 1})} would be one row: "
                        "give each variant once")
    tuning = None
    if tune:
        arms = [arm_for(cfg, variant, label, spaces) for variant, label in zip(variants, labels)]
        tuning = {"trials": tune, "seeds": seeds, "folds": cfg.sweep.folds, "seed": cfg.seed,
                  "arms": [{"label": label, "variant": a.variant, "metric": a.metric,
                            "space": {k: {d.kind: list(d.args)} for k, d in a.space.items()}}
                           for a, label in zip(arms, labels)]}
        space = {}
    else:
        space = {"seed": Distribution("grid", tuple(range(seeds)))}
    return create_sweep_dir(cfg, space, variants, kind="compare", tuning=tuning), cfg, space


# A strategy without a space file of its own is tuned on another's: OGM-GE shares OGM's knobs; a modality
# alone (and modality dropout's baseline knob) is tuned on naive's, the learning rate.
SPACE_OF = {"ogm_ge": "ogm", "unimodal": "naive"}


def default_spaces_dir() -> Path:
    """The shipped search_spaces/: the checkout's, or the copy an installed wheel carries."""
    from blendtune.shipped import spaces_dir
    return spaces_dir()


def arm_for(cfg: ExperimentConfig, variant: dict, label: str, spaces: Mapping[str, Any] | None):
    """An arm of a tuned comparison: its space (`spaces[label or strategy]`, a dict or a YAML path; else
    search_spaces/<strategy>.yaml) without the keys its variant fixes, and its held-out selection metric."""
    from blendtune.search_space import check_sweep
    from blendtune.tuning import Arm

    name = variant["strategy"]
    directory = None
    if isinstance(spaces, (str, Path)):  # a folder of <strategy>.yaml files (the CLI's --spaces)
        directory, spaces = Path(spaces), None
    given = (spaces or {}).get(label, (spaces or {}).get(name))
    if given is None:
        path = (directory or default_spaces_dir()) / f"{SPACE_OF.get(name, name)}.yaml"
        if not path.is_file():
            raise UserError(f"--tune: no search space for {label}: write {path} or pass spaces={{'{name}': {{...}}}}")
        given = path
    space = load_search_space(given) if isinstance(given, (str, Path)) else parse_space(dict(given), f"spaces[{label!r}]")
    space = {k: d for k, d in space.items() if k not in variant and k != "seed"}
    if not space:
        raise UserError(f"--tune: {label}'s search space is empty once its variant's own settings are removed")
    arm_cfg = with_overrides(cfg, variant)
    check_sweep(with_overrides(arm_cfg, {"sweep.search": "random"}), space, None, f"search space of {label}")
    head = variant.get("unimodal.modality") or ("prediction" if arm_cfg.train.predict != "fused" else "fused")
    score = cfg.sweep.metric.split("/")[0]  # acc, or map for multi-label data
    return Arm(variant, space, f"{score}/held_out/{head}")


def compare(model: Any = None, train: Any = None, test: Any = None, held_out: Any = None,
            strategies: str | Sequence[str] = ("naive", "gblend", "ogm_ge"), seeds: int = 5, *,
            experiment: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = (),
            resume: str | Path | None = None, data: Callable | None = None, num_classes: int | None = None,
            collate_fn: Callable | None = None, fusion: Any = None, config: Mapping[str, Any] | None = None,
            tune: int = 0, spaces: Mapping[str, Any] | None = None, **options: Any) -> Comparison:
    """Strategies x seeds as one Ray Tune sweep, then the report, as `blendtune compare`.

    The run is `experiment` (YAML; `overrides` as key=value strings or a dict) or your own `model` (a
    class or factory: each seed initialises its own weights) and `train`/`test` datasets (or a `data`
    factory), shipped to the trials through Ray's object store. `strategies`: names or variants
    (`"gblend:ema=0.5"`, `"unimodal:audio"`). `options`: settings by keyword (epochs, lr, batch_size...,
    and the sweep's: storage_path, address, max_concurrent, folds); `config`: any key in full. `resume`: an
    interrupted comparison's folder (with the same objects). `tune=N`: each strategy first gets N trials of
    random search over its space (`spaces={"gblend": {...}}`, else search_spaces/<strategy>.yaml), selected
    on held-out data (the mean over `folds` held-out folds), then its choice runs on `seeds` fresh seeds."""
    parts = _parts(model, train, test, held_out, data, num_classes, collate_fn, fusion)
    if parts is not None and test is None and data is None:
        raise UserError("compare(): give test= (the report compares test scores; selection stays on held-out data)")
    names: list[str] = []
    try:
        names = [v["strategy"] for v in strategy_variants(strategies)] if resume is None else []
        return comparison(experiment, overrides, strategies, seeds, resume, parts, fusion, options, config,
                          tune=tune, spaces=spaces)
    except UserError as e:
        raise in_python_terms(e, "compare", names, sweeps=True) from None


def comparison(experiment, overrides, strategies, seeds: int, resume, parts: UserParts | None = None, fusion=None,
               options: dict | None = None, config: Mapping[str, Any] | None = None,
               on_start: Callable[[Path], None] | None = None, tune: int = 0,
               spaces: Mapping[str, Any] | None = None) -> Comparison:
    """compare, speaking config keys (the CLI's `blendtune compare` calls this)."""
    if resume is not None:
        run_dir = Path(resume)
        cfg, space, variants = load_sweep(run_dir)
    else:
        variants = strategy_variants(strategies)
        cfg = _sweep_config("compare", experiment, overrides, parts, fusion, [v["strategy"] for v in variants],
                            options or {}, config)
        run_dir, cfg, space = new_comparison(cfg, variants, seeds, tune, spaces)
    if on_start is not None:
        on_start(run_dir)
    searcher, num_samples = _equal_budget_searcher(run_dir)
    results = run_sweep(cfg, space, run_dir, TrialConfig(cfg), variants, resume=resume is not None, parts=parts,
                        searcher=searcher, num_samples=num_samples)
    raise_failed_trials(results)
    report = write_report(run_dir)
    with (run_dir / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    return Comparison(run_dir, report.read_text(), rows, results)


def _equal_budget_searcher(run_dir: Path):
    """compare --tune's searcher (and its trial count) from what the comparison recorded; (None, None) else."""
    from blendtune.runs import load_tuning
    from blendtune.tuning import Arm, make_searcher, total_trials

    tuning = load_tuning(run_dir)
    if not tuning:
        return None, None
    arms = [Arm(a["variant"], parse_space(a["space"], a["label"]), a["metric"]) for a in tuning["arms"]]
    searcher = make_searcher(arms, tuning["trials"], tuning["seeds"], tuning["folds"], tuning["seed"])
    return searcher, total_trials(len(arms), tuning["trials"], tuning["seeds"], tuning["folds"])


def raise_failed_trials(results) -> None:
    """Trials that failed (not diverged: those end and are reported) stop the command with their first error."""
    errors = [r for r in results if r.error]
    if errors:
        first = str(errors[0].error).strip().splitlines()[-1]
        raise UserError(f"{len(errors)} of {len(results)} trials failed (first: {first}); "
                        f"fix the cause and resume with --resume")


def run_python_sweep(space, model, train, test, held_out, strategy, experiment, overrides, resume, data,
                     num_classes, collate_fn, fusion, options: dict, config: Mapping[str, Any] | None = None) -> SweepResult:
    """blendtune.sweep (its arguments are documented there)."""
    caller = "sweep"
    parts = _parts(model, train, test, held_out, data, num_classes, collate_fn, fusion)
    names = [strategy] if strategy else []
    try:
        if resume is not None:
            run_dir = Path(resume)
            cfg, parsed, variants = load_sweep(run_dir)
        else:
            if space is None:
                raise UserError("sweep(): give space= (a dict like search_spaces/*.yaml, or its path)")
            parsed = load_search_space(space) if isinstance(space, (str, Path)) else parse_space(dict(space), "space")
            if strategy:  # the strategy first: its options' keywords are found by it
                overrides = {"strategy": strategy, **_as_dict(overrides)}
            cfg = _sweep_config(caller, experiment, overrides, parts, fusion, names or None, options, config)
            names = names or [cfg.strategy]
            variants = None
            run_dir = create_sweep_dir(cfg, parsed, None)  # after every check, as the CLI
        results = run_sweep(cfg, parsed, run_dir, TrialConfig(cfg), variants, resume=resume is not None, parts=parts)
    except UserError as e:
        raise in_python_terms(e, caller, names, sweeps=True) from None
    return SweepResult(run_dir, results)


def _parts(model, train, test, held_out, data, num_classes, collate_fn, fusion) -> UserParts | None:
    if model is None and train is None and data is None:
        return None  # a YAML experiment (model._target_ / data._target_ or a built-in dataset)
    if train is None and data is None:
        raise UserError("give train= (and test=) or data= with model=")
    return UserParts(model=model, train=train, test=test, held_out=held_out, data=data, num_classes=num_classes,
                     collate_fn=collate_fn, fusion=fusion if fusion is not None and not isinstance(fusion, str) else None)


def _as_dict(overrides: Sequence[str] | Mapping[str, Any]) -> dict:
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out = {}
    for item in overrides:
        key, equals, value = str(item).partition("=")
        if not equals:
            raise UserError(f"override {item!r}: expected key=value, e.g. optim.lr=0.01")
        out[key] = override_value(value, f"override {item!r}")
    return out


def _sweep_config(caller: str, experiment, overrides, parts: UserParts | None, fusion, strategies: list[str] | None,
                  options: dict, config: Mapping[str, Any] | None) -> ExperimentConfig:
    """The sweep's base config: the experiment file (or the schema's defaults), then the objects' marks,
    `overrides`, and the keywords (`epochs=3`, `num_samples=8`, a strategy's options)."""
    base: dict[str, Any] = {}
    if parts is not None:
        base["data._target_"] = PYTHON_OBJECTS
        if parts.model is not None:
            base["model._target_"] = PYTHON_OBJECTS
        base.setdefault("name", caller)
    if isinstance(fusion, str):
        base["model.fusion"] = fusion
    if isinstance(overrides, Mapping):
        first = with_overrides(load_config(experiment, []), {**base, **overrides})
    else:  # key=value strings, read as the command line reads them (same messages)
        first = load_config(experiment, list(overrides))
        first = with_overrides(first, base) if base else first
    keywords = keyword_overrides(caller, options, strategies or [first.strategy], sweeps=True, config=dict(config or {}))
    return with_overrides(first, keywords) if keywords else first

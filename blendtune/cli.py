"""blendtune command line.

    blendtune train   EXPERIMENT.yaml [key=value ...]          one run (workers=N: Ray Train DDP)
    blendtune train   --resume RUN_DIR [key=value ...]
    blendtune sweep   EXPERIMENT.yaml --space SPACE.yaml [key=value ...]   Ray Tune
    blendtune sweep   --resume RUN_DIR
    blendtune compare EXPERIMENT.yaml --strategies naive,gblend,ogm_ge,unimodal:audio --seeds 3 [key=value ...]
    blendtune compare EXPERIMENT.yaml --strategies naive,gblend --tune 8 --seeds 5   tuned at an equal budget
    blendtune leaderboard RUN_DIR [RUN_DIR ...] [--out FILE]   strategies x experiments, average rank
    blendtune report  RUN_DIR
    blendtune data check    DATASET|EXPERIMENT.yaml [--root DIR] [key=value ...]   walk every file
    blendtune data prepare  DATASET|EXPERIMENT.yaml [--root DIR]   decode once into a cache training reads
    blendtune data download fsdd --root DIR

sweep, compare and report print their run directory as the last line of stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from blendtune.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blendtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one model with a balancing strategy")
    train.add_argument("experiment", nargs="?", help="experiment YAML, or a shipped one's name (see experiments/)")
    train.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. optim.lr=0.01)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")

    sweep = sub.add_parser("sweep", help="Ray Tune sweep over a search space")
    sweep.add_argument("experiment", nargs="?", help="experiment YAML")
    sweep.add_argument("overrides", nargs="*", help="config overrides, key=value (sweep.num_samples=8, ...)")
    sweep.add_argument("--space", help="search space YAML, or a shipped one's name (see search_spaces/)")
    sweep.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted sweep")

    compare = sub.add_parser("compare", help="strategies x seeds as one sweep, then a report")
    compare.add_argument("experiment", nargs="?", help="experiment YAML")
    compare.add_argument("overrides", nargs="*", help="config overrides, key=value")
    compare.add_argument("--strategies", default="naive,gblend,ogm_ge",
                         help="comma-separated; unimodal:MODALITY for one modality alone; "
                              "STRATEGY:KEY=VALUE[:KEY=VALUE] a variant with options (gblend:ema=0.5)")
    compare.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per strategy (5: a 95%% CI worth reading)")
    compare.add_argument("--tune", type=int, default=0, metavar="N",
                         help="first tune each strategy at an equal budget: N random-search trials over its space, "
                              "selected on held-out data (sweep.folds=k: the mean over k folds), then its choice on "
                              "--seeds fresh seeds")
    compare.add_argument("--spaces", metavar="DIR", default=None,
                         help="with --tune: a folder of <strategy>.yaml search spaces (default: search_spaces/)")
    compare.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted comparison")

    report = sub.add_parser("report", help="rebuild report.md, results.csv and plots of a sweep")
    report.add_argument("run_dir")

    board = sub.add_parser("leaderboard", help="one table of strategies x experiments from several comparisons")
    board.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="comparison folders (compare, compare --tune)")
    board.add_argument("--out", default=None, help="also write the table to this markdown file")

    data = sub.add_parser("data", help="check or download datasets").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="count samples per split/class and list every bad file; "
                                          "exit status 1 if any")
    check.add_argument("dataset", help="a dataset name (crema_d, av_csv, features, avdigits, ...) or an experiment YAML")
    check.add_argument("overrides", nargs="*", help="config overrides, e.g. data.crema_d.frames_dir=Image-02-FPS")
    check.add_argument("--root", help="the dataset's folder (default: data.root / $BLENDTUNE_DATA_ROOT)")
    prepare = data.add_parser("prepare", help="decode every clip once into a memory-mapped cache that training "
                                              "(every trial of a sweep) then reads")
    prepare.add_argument("dataset", help="a file layout (crema_d, av_csv) or an experiment YAML")
    prepare.add_argument("overrides", nargs="*", help="config overrides, e.g. data.crema_d.image_size=112")
    prepare.add_argument("--root", help="the dataset's folder (default: data.root / $BLENDTUNE_DATA_ROOT)")
    download = data.add_parser("download", help="fetch a public dataset and verify it")
    download.add_argument("name", choices=["fsdd"])
    download.add_argument("--root", required=True, help="data root; FSDD goes to ROOT/fsdd/recordings")
    download.add_argument("--url", default=None, help="archive URL (default: FSDD on GitHub at the pinned commit)")
    return parser


def data_command(args) -> int:
    if args.data_command == "download":
        from blendtune.data.download import FSDD_URL, download_fsdd
        print(download_fsdd(Path(args.root), url=args.url or FSDD_URL))
        return 0
    from blendtune.config import load_config
    from blendtune.data import DATASETS
    from blendtune.build import dataset_options
    if args.dataset.endswith((".yaml", ".yml")):
        cfg = load_config(args.dataset, args.overrides)
    else:
        cfg = load_config(None, [f"data.dataset={args.dataset}", *args.overrides])
    adapter = DATASETS.get(cfg.data.dataset)(root=args.root or cfg.data.root, **dataset_options(cfg))
    if args.data_command == "prepare":
        if not hasattr(adapter, "prepare"):
            raise UserError(f"data prepare: {cfg.data.dataset!r} is held in memory already; only file layouts "
                            "(crema_d, av_csv) have a cache")
        began = time.perf_counter()
        cache = adapter.prepare(skip_bad=cfg.data.skip_bad)
        m = cache.manifest
        print(f"prepared {m['clips']} clips, {m['frames']} frames ({m['frame_size']}x{m['frame_size']}), audio at "
              f"{m['sample_rate']} Hz: {cache.size_bytes() / 1e6:.1f} MB in {time.perf_counter() - began:.1f} s")
        print(cache.directory)
        return 0
    report = adapter.check()
    print(report.format())
    return 1 if report.problems else 0


def _split_resume(args) -> list[str]:
    overrides = list(args.overrides)
    if args.resume and args.experiment:  # `--resume DIR key=value`: argparse reads the first override as experiment
        overrides.insert(0, args.experiment)
    return overrides


def sweep_command(args) -> Path:
    from blendtune.config import load_config
    from blendtune.runs import create_sweep_dir
    from blendtune.search_space import load_search_space

    def new_sweep():
        if not args.experiment or not args.space:
            raise UserError("blendtune sweep: give an experiment YAML and --space SPACE.yaml")
        cfg, space = load_config(args.experiment, args.overrides), load_search_space(args.space)
        return create_sweep_dir(cfg, space, None, source=args.space), cfg, space, None
    return _run_sweep_command(args, new_sweep, "sweep")


def compare_command(args) -> Path:
    """A thin layer over blendtune.comparisons.comparison (what `blendtune.compare` runs from Python)."""
    from blendtune.comparisons import comparison

    if args.resume and (args.experiment or args.overrides):
        raise UserError("blendtune compare --resume takes no experiment or overrides: it finishes the comparison "
                        "as it was started")
    if not args.resume and not args.experiment:
        raise UserError("blendtune compare: give an experiment YAML")

    def started(run_dir: Path) -> None:
        _started(run_dir, "compare")
        print(f"compare dir: {run_dir}", flush=True)
    done = comparison(args.experiment, args.overrides, args.strategies, args.seeds, args.resume, on_start=started,
                      tune=args.tune, spaces=args.spaces)
    print(done.report)
    return done.run_dir


def _run_sweep_command(args, new_sweep, kind: str) -> Path:
    from blendtune.config import TrialConfig
    from blendtune.runs import load_sweep
    from blendtune.sweeps import run_sweep

    if args.resume:
        if args.experiment or args.overrides:
            raise UserError(f"blendtune {kind} --resume takes no experiment or overrides: it finishes the sweep "
                            "as it was started")
        run_dir = Path(args.resume)
        cfg, space, variants = load_sweep(run_dir)
    else:
        run_dir, cfg, space, variants = new_sweep()
    _started(run_dir, kind)
    print(f"{kind} dir: {run_dir}", flush=True)
    results = run_sweep(cfg, space, run_dir, TrialConfig(cfg), variants, resume=bool(args.resume))
    _summarise(results, cfg)
    return run_dir


def _summarise(results, cfg) -> None:
    from blendtune.comparisons import raise_failed_trials
    raise_failed_trials(results)
    try:
        best = results.get_best_result(metric=cfg.sweep.metric, mode=cfg.sweep.mode, scope="all")
        print(f"best {cfg.sweep.metric}: {best.metrics.get(cfg.sweep.metric)} with {best.config}")
    except Exception:  # e.g. metric absent in every trial
        pass


def train_command(args) -> Path:
    from blendtune.config import load_config
    from blendtune.evaluation import score_name
    from blendtune.runs import create_run_dir, load_run_config, lock_run, removed_unless_started, resume_config, write_config

    overrides = _split_resume(args)
    if args.resume:
        run_dir = Path(args.resume)
        load_run_config(run_dir)  # a folder that is not a run: that line first
        lock = lock_run(run_dir)  # noqa: F841  (held until this process exits)
        cfg = resume_config(run_dir, overrides)  # every check first: the run's files stay as they were if one fails
        write_config(run_dir, cfg)
    else:
        if not args.experiment:
            raise UserError("blendtune train: give an experiment YAML (e.g. experiments/synthetic_gblend.yaml)")
        cfg = load_config(args.experiment, overrides)
        run_dir = create_run_dir(cfg)  # after every check that can refuse the run
        lock = lock_run(run_dir)  # noqa: F841
    _started(run_dir, "train")
    print(f"run dir: {run_dir}", flush=True)

    from blendtune.launch import train_locally, train_with_ray
    with contextlib.nullcontext() if args.resume else removed_unless_started(run_dir):
        final = (train_with_ray if cfg.workers > 1 else train_locally)(cfg, run_dir, resume=bool(args.resume))
    score = score_name(final)
    heads = [k.split("/")[-1] for k in final if k.startswith(f"{score}/test/")]
    if heads:
        name = "accuracy" if score == "acc" else "mAP"
        print(f"final test {name}: " + ", ".join(f"{h} {final[f'{score}/test/{h}']:.4f}" for h in heads))
    return run_dir


_RUNNING: dict = {}  # the directory of the run or sweep in progress, for the Ctrl-C message


def _started(run_dir: Path, kind: str) -> None:
    _RUNNING.update(run_dir=run_dir, kind=kind)


def user_message(e: UserError) -> str:
    """A UserError raised in a DataLoader worker arrives wrapped in the worker's traceback: keep its message."""
    text = str(e)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after --options; argparse leaves those in `extra`
    unknown = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        if args.command == "data":
            return data_command(args)
        if args.command == "train":
            run_dir = train_command(args)
        elif args.command == "sweep":
            run_dir = sweep_command(args)
        elif args.command == "compare":
            run_dir = compare_command(args)
        elif args.command == "leaderboard":
            from blendtune.leaderboard import leaderboard
            table = leaderboard([Path(d) for d in args.run_dirs])
            if args.out:
                Path(args.out).write_text(table)
            print(table)
            return 0
        else:
            from blendtune.report import write_report
            run_dir = Path(args.run_dir)
            print(write_report(run_dir).read_text())
        print(run_dir)
        return 0
    except UserError as e:
        print(f"blendtune: error: {user_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _RUNNING:
            print(f"blendtune: interrupted; resume with `blendtune {_RUNNING['kind']} --resume {_RUNNING['run_dir']}`",
                  file=sys.stderr)
        else:
            print("blendtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The shape of the code: imports point down the layers, a strategy is one file + one registry entry,
keys no strategy of the run reads are errors."""
import ast
import dataclasses

import pytest

from blendtune.errors import UserError
from conftest import REPO, TINY

# cli -> config -> sweep (Tune) -> launch (Train) -> worker -> loop -> strategies -> models/data -> functional
LAYERS = [
    ["blendtune", "blendtune.cli", "blendtune.api"],
    ["blendtune.comparisons"],
    ["blendtune.leaderboard"],
    ["blendtune.report"],
    ["blendtune.runs"],
    ["blendtune.search_space"],
    ["blendtune.config"],
    ["blendtune.sweeps", "blendtune.tuning"],
    ["blendtune.launch"],
    ["blendtune.worker"],
    ["blendtune.build", "blendtune.loggers", "blendtune.wandb_files"],
    ["blendtune.loop"],
    ["blendtune.services", "blendtune.feeding"],
    ["blendtune.evaluation", "blendtune.checkpoint"],
    ["blendtune.strategies"],
    ["blendtune.models", "blendtune.data", "blendtune.optim"],
    ["blendtune.functional", "blendtune.distributed", "blendtune.devices", "blendtune.registry", "blendtune.errors",
     "blendtune.storage", "blendtune.shipped"],
]


def _layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if module == name or (name != "blendtune" and module.startswith(name + ".")):
                best = i
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def _imports() -> dict[str, set[str]]:
    root = REPO / "blendtune"
    modules = {".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): f
               for f in root.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("blendtune"):
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("blendtune")}
        resolved = set()
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + ".") and t != "blendtune":
                resolved.add(t)
        edges[name] = resolved
    return edges


def test_imports_only_point_down_the_layers():
    upward = [f"{a} -> {b}" for a, targets in _imports().items() for b in targets if _layer(b) < _layer(a)]
    assert not upward, "imports that point up: " + "; ".join(sorted(upward))


def test_below_config_only_the_worker_and_the_builder_read_an_experiment_config():
    # loop, strategies, models and data take plain arguments (their options dataclasses): none mentions the config
    for path in (REPO / "blendtune").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        if _layer(module) > _layer("blendtune.build"):
            text = path.read_text()
            assert "ExperimentConfig" not in text and "omegaconf" not in text.lower(), module


def test_a_new_strategy_is_one_file_and_one_registry_entry(tmp_path):
    """Written as a user would in their own module: options beside the class, registered together. The
    schema grows its section, the loop runs it, its options are validated."""
    from blendtune import config
    from blendtune.errors import OptionError
    from blendtune.functional import classification_loss
    from blendtune.models import FUSED
    from blendtune.strategies import STRATEGIES, BalancingStrategy
    from blendtune.build import build_trainer

    @dataclasses.dataclass
    class HeadMixOptions:
        unimodal_weight: float = 0.5

        def validate(self):
            if self.unimodal_weight < 0:
                raise OptionError("unimodal_weight", f"expected >= 0, got {self.unimodal_weight}")

    @STRATEGIES.register("head_mix", options=HeadMixOptions)
    class HeadMix(BalancingStrategy):
        detach_unimodal_heads = False

        def loss(self, out, targets, epoch):
            uni = sum(classification_loss(out.logits[m], targets) for m in self.model.modalities)
            return classification_loss(out.logits[FUSED], targets) + self.options.unimodal_weight * uni

    try:
        config.assemble_schema()
        cfg = config.load_config(None, TINY + ["strategy=head_mix", "head_mix.unimodal_weight=0.25"])
        assert cfg.head_mix.unimodal_weight == 0.25
        trainer = build_trainer(cfg)
        assert trainer.fit()["acc/test/fused"] > 0.1
        with pytest.raises(UserError, match=r"config key 'head_mix.unimodal_weight': expected >= 0"):
            config.load_config(None, TINY + ["strategy=head_mix", "head_mix.unimodal_weight=-1"])
    finally:
        STRATEGIES.unregister("head_mix")
        config.assemble_schema()
    with pytest.raises(UserError, match="unknown config key 'head_mix'"):
        config.load_config(None, ["head_mix.unimodal_weight=0.25"])


@pytest.mark.parametrize("overrides,expected", [
    (["strategy=gblend", "ogm.alpha=0.3"], r"ogm\.alpha"),
    (["strategy=ogm", "ogm.noise_scale=0.5"], r"ogm\.noise_scale"),          # OGM has no GE noise
    (["strategy=naive", "data.crema_d.num_frames=4"], r"data\.crema_d\.num_frames"),
])
def test_keys_no_strategy_of_the_run_reads_are_errors(overrides, expected):
    from blendtune.config import check_keys_are_used, load_config
    with pytest.raises(UserError, match=expected + r".*no strategy or dataset of this run reads them"):
        check_keys_are_used(load_config(None, overrides))
    check_keys_are_used(load_config(None, ["strategy=ogm_ge", "ogm.noise_scale=0.5", "ogm.alpha=0.3"]))


def test_a_sweep_accepts_keys_that_some_of_its_strategies_read():
    from blendtune.config import load_config
    from blendtune.search_space import check_sweep, parse_space
    cfg = load_config(None, ["strategy=naive", "gblend.super_epoch=1"])
    check_sweep(cfg, parse_space({"seed": {"grid": [0]}}, "s"), variants=[{"strategy": "naive"}, {"strategy": "gblend"}])
    with pytest.raises(UserError, match=r"gblend\.super_epoch"):
        check_sweep(cfg, parse_space({"seed": {"grid": [0]}}, "s"), variants=[{"strategy": "naive"}])


def test_one_rule_for_asking_ray_for_a_gpu():
    import torch
    from blendtune.devices import wants_gpu
    assert wants_gpu("cuda") and wants_gpu("cuda:1")   # launchers and the loop agree for cuda:N too
    assert not wants_gpu("cpu")
    assert wants_gpu("auto") == torch.cuda.is_available()


def test_the_cli_starts_without_importing_torchvision():
    """torchvision costs about two seconds at every start (each CLI call, each Ray worker); only the
    image datasets and ResNet encoders need it, and they import it when used."""
    import subprocess
    import sys
    code = "import sys, blendtune.cli, blendtune.worker, blendtune.sweeps; print('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"

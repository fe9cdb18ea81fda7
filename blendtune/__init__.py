"""blendtune: multimodal classifiers that stay balanced across modalities (G-Blend, OGM, OGM-GE).

    blendtune.fit(model=..., train=..., held_out=..., test=..., strategy="ogm_ge", epochs=10, alpha=0.8)
    blendtune.sweep(space={...}, experiment="experiments/x.yaml", overrides=["model._target_=my_pkg.MyAV"])
    blendtune.Trainer(model, strategy, splits, optimizer, scheduler, TrainOptions(...))   # built parts

The math is importable on its own (`blendtune.ogr`, `gblend_weights`, `ogm_coefficients`, ...).
"""
from blendtune.functional import OGR, gblend_weights, modulate_gradients_, ogm_coefficients, ogm_rho, ogr

__version__ = "0.1.0"
__all__ = ["OGR", "ogr", "gblend_weights", "ogm_coefficients", "ogm_rho", "modulate_gradients_", "__version__",
           "fit", "sweep", "FitResult", "Trainer", "TrainOptions", "build_strategy", "STRATEGIES"]

_LAZY = {"fit": "blendtune.api", "sweep": "blendtune.api", "FitResult": "blendtune.api",
         "Trainer": "blendtune.loop", "TrainOptions": "blendtune.loop",
         "build_strategy": "blendtune.strategies", "STRATEGIES": "blendtune.strategies"}


def __getattr__(name: str):
    # The API is imported on first use: `import blendtune` (and the CLI's start) stays light.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'blendtune' has no attribute {name!r}")

"""blendtune: multimodal classifiers that stay balanced across modalities (G-Blend, OGM, OGM-GE, ...).

    result = blendtune.fit(model=MyAV(), train=train_ds, test=test_ds, strategy="ogm_ge", epochs=10, alpha=0.8,
                           run_dir="runs/ogm_ge")
    result.predict(batch).classes; blendtune.load("runs/ogm_ge", model=MyAV())
    blendtune.compare(model=MyAV, train=train_ds, test=test_ds, strategies=["naive", "ogm_ge"], seeds=5)
    blendtune.sweep(space={"ogm.alpha": {"uniform": [0.1, 1.0]}}, model=MyAV, train=train_ds, test=test_ds)
    blendtune.Trainer(model, strategy, splits, optimizer, scheduler, TrainOptions(...))   # built parts

The math is importable on its own (`blendtune.ogr`, `gblend_weights`, `ogm_coefficients`, ...).
"""
from blendtune.functional import OGR, gblend_weights, modulate_gradients_, ogm_coefficients, ogm_rho, ogr

__version__ = "0.2.0"
__all__ = ["OGR", "ogr", "gblend_weights", "ogm_coefficients", "ogm_rho", "modulate_gradients_", "__version__",
           "fit", "load", "compare", "sweep", "FitResult", "Predictions", "Comparison", "SweepResult", "Trainer",
           "TrainOptions", "build_strategy", "STRATEGIES"]

_LAZY = {"fit": "blendtune.api", "load": "blendtune.api", "sweep": "blendtune.api", "FitResult": "blendtune.api",
         "Predictions": "blendtune.api", "compare": "blendtune.comparisons", "Comparison": "blendtune.comparisons",
         "SweepResult": "blendtune.comparisons",
         "Trainer": "blendtune.loop", "TrainOptions": "blendtune.loop",
         "build_strategy": "blendtune.strategies", "STRATEGIES": "blendtune.strategies"}


def __getattr__(name: str):
    # The API is imported on first use: `import blendtune` (and the CLI's start) stays light.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'blendtune' has no attribute {name!r}")

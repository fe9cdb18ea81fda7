"""OGM-GE: OGM plus Generalization Enhancement - Gaussian noise with std `noise_scale * std(g)` (of the
unmodulated gradient, per parameter tensor) added to every modality's modulated encoder gradients."""
from blendtune.strategies.base import STRATEGIES
from blendtune.strategies.ogm import OGM, OGMOptions


@STRATEGIES.register("ogm_ge", options=OGMOptions, section="ogm")
class OGMGE(OGM):
    use_noise = True
    ignored_options = ()

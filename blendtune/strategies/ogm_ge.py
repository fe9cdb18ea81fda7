"""OGM-GE: OGM plus Generalization Enhancement - Gaussian noise with std `noise_scale * std(g)` (of the
unmodulated gradient, per parameter tensor) added to every modality's modulated encoder gradients."""
from blendtune.strategies.base import STRATEGIES
from blendtune.strategies.ogm import OGM


@STRATEGIES.register("ogm_ge")
class OGMGE(OGM):
    use_noise = True

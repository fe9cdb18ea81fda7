"""blendtune: multimodal classifiers that stay balanced across modalities (G-Blend, OGM, OGM-GE)."""
from blendtune.functional import OGR, gblend_weights, modulate_gradients_, ogm_coefficients, ogm_rho, ogr

__version__ = "0.1.0"
__all__ = ["OGR", "ogr", "gblend_weights", "ogm_coefficients", "ogm_rho", "modulate_gradients_", "__version__"]

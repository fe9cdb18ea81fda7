"""Late-fusion classifiers: encoders and fusions by registry name, one head per modality + fused head."""
from blendtune.models.encoders import ENCODERS, build_encoder
from blendtune.models.fusion import FUSIONS, build_fusion
from blendtune.models.late_fusion import LateFusionClassifier, ModelOutput, FUSED

__all__ = ["ENCODERS", "FUSIONS", "build_encoder", "build_fusion", "LateFusionClassifier", "ModelOutput", "FUSED"]

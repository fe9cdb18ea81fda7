"""Late-fusion classifiers: encoders and fusions by registry name, one head per modality + fused head."""
from blendtune.models.encoders import ENCODERS, build_encoder
from blendtune.models.fusion import FUSIONS, build_fusion
from blendtune.models.late_fusion import (FUSED, EncoderSpec, LateFusionClassifier, ModalityEncoders, ModelOutput,
                                          build_late_fusion, classifier_for, encoders_for, feature_dims_of,
                                          make_fusion)

__all__ = ["ENCODERS", "FUSIONS", "FUSED", "EncoderSpec", "LateFusionClassifier", "ModalityEncoders", "ModelOutput",
           "build_encoder", "build_fusion", "build_late_fusion", "classifier_for", "encoders_for", "feature_dims_of",
           "make_fusion"]

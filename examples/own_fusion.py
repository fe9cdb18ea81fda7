"""A fusion module of your own. Any module mapping the features (a dict of (B, D_m) tensors) to (B, C)
logits works with every strategy but MLA (one shared head); OGM and OGM-GE also need
`unimodal_logits(features)`: each modality's share of the fused classifier, which OGM scores.

    PYTHONPATH=examples .venv/bin/python examples/own_fusion.py [--epochs 6]
"""
import argparse

from torch import nn

import blendtune
from my_av import TwoStreamNet, make_data


class BilinearFusion(nn.Module):
    """Each stream's linear score plus a bilinear interaction of the two."""

    def __init__(self, feature_dims: dict, num_classes: int):
        super().__init__()
        self.audio = nn.Linear(feature_dims["audio"], num_classes)
        self.video = nn.Linear(feature_dims["video"], num_classes)
        self.bilinear = nn.Bilinear(feature_dims["audio"], feature_dims["video"], num_classes)

    def forward(self, features):
        a, v = features["audio"], features["video"]
        return self.audio(a) + self.video(v) + self.bilinear(a, v)

    def unimodal_logits(self, features):
        return {"audio": self.audio(features["audio"]), "video": self.video(features["video"])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    train, test = make_data()
    # `fusion` takes a module or, as here, a factory called with the measured feature sizes and the classes
    result = blendtune.fit(TwoStreamNet, train, test, strategy="ogm_ge", fusion=BilinearFusion, alpha=0.8,
                           epochs=args.epochs, lr=1e-3, optimizer="adam", progress=False)
    m = result.metrics
    print(f"bilinear fusion + OGM-GE: test accuracy fused {m['acc/test/fused']:.3f}; "
          f"OGM coefficients audio {m['ogm/coeff/audio']:.3f}, video {m['ogm/coeff/video']:.3f}")


if __name__ == "__main__":
    main()

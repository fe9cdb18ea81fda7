"""Per-modality encoders. A builder takes the modality's input shape (no batch dim) and returns a module
with `out_dim`; it accepts `(B, *shape)` and, for frame stacks `(B, T, C, H, W)`, pools over time."""
from __future__ import annotations


import torch
from torch import nn

from blendtune.registry import Registry

ENCODERS: Registry = Registry("encoder")


class TemporalPool(nn.Module):
    """Applies a per-frame encoder to (B, T, ...) inputs and averages the features over T."""

    def __init__(self, frame_encoder: nn.Module):
        super().__init__()
        self.frame_encoder = frame_encoder
        self.out_dim = frame_encoder.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        return self.frame_encoder(x.flatten(0, 1)).view(b, t, -1).mean(dim=1)


class SpecCNN(nn.Module):
    """Four conv-BN-ReLU blocks and global average pooling: for spectrograms or small images (C, H, W)."""

    def __init__(self, in_channels: int, dim: int, width: int = 32, dropout: float = 0.0):
        super().__init__()
        layers, c = [], in_channels
        for i, out in enumerate([width, width * 2, width * 4, width * 4]):
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project = nn.Sequential(nn.Dropout(dropout), nn.Linear(c, dim), nn.ReLU(inplace=True))
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(x))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 without its classifier; the stem takes `in_channels` (1 for spectrograms)."""

    def __init__(self, in_channels: int, dim: int, dropout: float = 0.0):
        super().__init__()
        import torchvision  # imported when used: it costs a second or two at every start
        net = torchvision.models.resnet18(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        self.net = net
        self.project = nn.Identity() if dim == 512 else nn.Sequential(nn.Dropout(dropout), nn.Linear(512, dim))
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.net(x))


class MLP(nn.Module):
    """For feature vectors (D,); sequences of vectors (T, D) are mean-pooled over T first."""

    def __init__(self, in_dim: int, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.ReLU(inplace=True))
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.mean(dim=1) if x.dim() == 3 else x)


def _image_encoder(make, shape: tuple[int, ...]) -> nn.Module:
    if len(shape) == 3:
        return make(shape[0])
    if len(shape) == 4:  # (T, C, H, W): frames, pooled over time
        return TemporalPool(make(shape[1]))
    raise ValueError(f"expected an input shape (C, H, W) or (T, C, H, W), got {shape}")


@ENCODERS.register("spec_cnn")
def spec_cnn(input_shape, dim=128, hidden=32, dropout=0.0) -> nn.Module:
    return _image_encoder(lambda c: SpecCNN(c, dim, width=hidden, dropout=dropout), input_shape)


@ENCODERS.register("resnet18")
def resnet18(input_shape, dim=512, hidden=0, dropout=0.0) -> nn.Module:
    return _image_encoder(lambda c: ResNet18(c, dim, dropout=dropout), input_shape)


@ENCODERS.register("mlp")
def mlp(input_shape, dim=128, hidden=256, dropout=0.0) -> nn.Module:
    if len(input_shape) not in (1, 2):
        raise ValueError(f"mlp expects inputs (D,) or (T, D), got {input_shape}")
    return MLP(input_shape[-1], dim, hidden, dropout)


def build_encoder(name: str, input_shape: tuple[int, ...], dim: int, hidden: int, dropout: float) -> nn.Module:
    return ENCODERS.get(name)(tuple(input_shape), dim=dim, hidden=hidden, dropout=dropout)

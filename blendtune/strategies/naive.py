"""Naive late fusion: only the fused head's loss trains the encoders (the baseline G-Blend beats)."""
from blendtune.strategies.base import STRATEGIES, BalancingStrategy


@STRATEGIES.register("naive")
class Naive(BalancingStrategy):
    pass

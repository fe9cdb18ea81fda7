"""Balancing strategies: one file each, registered by name (the `strategy:` config key)."""
from blendtune.strategies.base import BalancingStrategy, STRATEGIES, head_losses, probe_loss
from blendtune.strategies import naive, unimodal, modality_dropout, gblend, ogm, ogm_ge  # noqa: F401

__all__ = ["BalancingStrategy", "STRATEGIES", "head_losses", "probe_loss"]

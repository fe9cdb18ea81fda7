"""Balancing strategies: one file each, registered by name (the `strategy:` config key) together with
its options dataclass (the config section of the same name)."""
from blendtune.strategies.base import (STRATEGIES, BalancingStrategy, HeadLoss, TrainingContext, build_strategy, check_held_out,
                                       check_required_options,
                                       fusion_for, head_losses, probe_loss, strategy_options)
from blendtune.strategies import naive, unimodal, modality_dropout, gblend, ogm, ogm_ge, mmpareto, pmr, mla  # noqa: F401
from blendtune.strategies import ume_umt  # noqa: F401
from blendtune.strategies import agm  # noqa: F401

__all__ = ["BalancingStrategy", "HeadLoss", "STRATEGIES", "TrainingContext", "build_strategy", "check_held_out", "check_required_options", "fusion_for",
           "head_losses", "probe_loss", "strategy_options"]

"""Which objective a run trains with: token cross-entropy (sft: SFT and pretraining alike) or a preference loss
(dpo: objectives/preference.py, with the reference model the trainer built) or a reward model's pairwise loss (rm:
objectives/reward.py) or KTO (kto: objectives/kto.py, with the reference model)."""

from __future__ import annotations

from typing import Optional

from ..config.schema import Config
from .base import Objective
from .kto import kto_objective
from .preference import Reference, needs_reference, preference_objective
from .reward import REWARD
from .sft import SFT


def needs_reference_model(cfg: Config) -> bool:
    """Whether the run's objective compares against a reference model (the trainer builds it)."""
    return cfg.train.objective == "kto" or (cfg.train.objective == "dpo" and needs_reference(cfg.preference))


def objective_for(cfg: Config, reference: Optional[Reference] = None) -> Objective:
    if cfg.train.objective == "dpo":
        return preference_objective(cfg.preference, reference)
    if cfg.train.objective == "kto":
        if reference is None:
            raise ValueError("the kto objective needs a reference model")
        return kto_objective(cfg.preference, reference)
    if cfg.train.objective == "rm":
        return REWARD
    return SFT

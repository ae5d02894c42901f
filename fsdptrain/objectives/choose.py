"""Which objective a run trains with. Today one: token cross-entropy (SFT and pretraining alike)."""

from __future__ import annotations

from ..config.schema import Config
from .base import Objective
from .sft import SFT


def objective_for(cfg: Config) -> Objective:
    return SFT

"""Unlearning methods: each is one function over the loop's outputs plus, where it has any, a dataclass of its
own settings (defaults from OpenUnlearning's configs/trainer/*.yaml, help text beside them), in one small
module per family:

    ascent.py          ga, gd, kl
    preference.py      npo, simnpo, idk, dpo
    hinge.py           ihl (LoKU)
    reweighting.py     wga, satimp, undial, ceu
    representation.py  rmu, lunar        (hidden states through hooks.py)
    constrained.py     pdu, sibl         (a dual variable as the retain weight)
    gradient.py        gru               (its own backward pass)
    editing.py         lmcleaner         (a correction from a recorded trajectory)
    guidance.py        t3                (a classifier head on the frozen model)

`base.py` holds what they share (`LossInputs`, `Method`, `METHODS`, `method_loss`); `run.py` what the loop
does for the methods that need more than logits.
"""

from . import ascent, preference, hinge, reweighting, representation, constrained, gradient, editing, guidance  # noqa: F401,E401  registration order = `loku list methods` order
from .ascent import KLSettings
from .base import (METHODS, LossInputs, Method, MethodState, forget_weight, get_method, loss_units, method,
                   method_loss, retain_ce, setting_fields)
from .constrained import PDUSettings, SIBLSettings
from .editing import LMCleanerSettings
from .gradient import GRUSettings
from .guidance import T3Settings
from .hooks import capture
from .preference import DPOSettings, IdKSettings, NPOSettings, SimNPOSettings
from .representation import LunarSettings, RMUSettings
from .reweighting import CEUSettings, SatImpSettings, UNDIALSettings, WGASettings
from .run import MethodRun, SetupContext, set_trainable

__all__ = ["LossInputs", "Method", "MethodState", "METHODS", "method", "get_method", "method_loss", "loss_units",
           "forget_weight", "setting_fields", "retain_ce", "capture", "MethodRun", "SetupContext", "set_trainable",
           "NPOSettings", "SimNPOSettings", "KLSettings", "IdKSettings", "DPOSettings", "WGASettings",
           "SatImpSettings", "UNDIALSettings", "CEUSettings", "RMUSettings", "LunarSettings", "PDUSettings",
           "SIBLSettings", "GRUSettings", "LMCleanerSettings", "T3Settings"]

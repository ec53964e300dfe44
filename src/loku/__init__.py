"""loku: make a language model forget specific data while keeping the rest (LoKU: IHL + FILA)."""

from .config import UnlearnConfig
from .errors import LokuError
from .losses import METHODS, inverted_hinge_loss
from .models import load_model
from .train import UnlearnResult, unlearn

__version__ = "0.1.0"
__all__ = ["UnlearnConfig", "UnlearnResult", "LokuError", "METHODS", "inverted_hinge_loss", "load_model",
           "unlearn", "__version__"]

"""LARS for torch and transformers models (`pip install minilars[hf]`).

A peft-style tuner: `get_lars_model(model, LarsConfig(r=16), calibration)` puts a
LARS layer (y = x W^T + (x P) M, keeping only z = x P for dM = z^T dy) on every
target nn.Linear, recomputes each decoder layer from its float16 input in backward,
and computes the loss in slices of tokens. docs/hf.md has the measurements.

Nothing else in minilars imports this package: the NumPy engine runs without torch.
"""
from .config import LarsConfig
from .linear import LarsLinear, LarsLinearFunction
from .loss import lars_causal_lm_loss
from .model import LarsModel, get_lars_model

__all__ = ["LarsConfig", "LarsLinear", "LarsLinearFunction", "LarsModel", "get_lars_model", "lars_causal_lm_loss"]

"""LARS for torch and transformers models (`pip install minilars[hf]`).

A peft-style tuner: `get_lars_model(model, LarsConfig(r=16), calibration)` puts a
LARS layer (y = x W^T + (x P) M, keeping only z = x P for dM = z^T dy) on every
target nn.Linear, recomputes each decoder layer from its float16 input in backward,
and computes the loss in slices of tokens. docs/hf.md has the measurements.

Nothing else in minilars imports this package: the NumPy engine runs without torch.
"""
import importlib.util as _util

if _util.find_spec("torch") is None:  # every module here imports torch at its top
    raise ImportError("minilars.hf needs torch, which is not installed: pip install 'minilars[hf]' "
                      "(the rest of minilars runs without it)")
from .config import LarsConfig  # noqa: E402
from .linear import LarsLinear, LarsLinearFunction  # noqa: E402
from .loss import lars_causal_lm_loss  # noqa: E402
from .model import LarsModel, get_lars_model  # noqa: E402

__all__ = ["LarsConfig", "LarsLinear", "LarsLinearFunction", "LarsModel", "get_lars_model", "lars_causal_lm_loss"]

"""The models' activations by name: a leaf module (imports jax only), so the Transformer and the token
mixers can both use them without importing each other."""
from __future__ import annotations

import jax

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "linear": lambda x: x,
}
#: activations with f(c x) = c f(x) for c > 0, where the post's plain rule widens an FFN exactly.
HOMOGENEOUS_ACTIVATIONS = ("relu", "linear")

__all__ = ["ACTIVATIONS", "HOMOGENEOUS_ACTIVATIONS"]

"""cce_jax: Cut Cross-Entropy for JAX.

The cross-entropy of a linear head, ``e @ c.T``, against integer labels, computed without ever
building the N x V logit matrix (Wijmans et al., "Cut Your Losses in Large-Vocabulary Language
Models", 2024). Start with :func:`linear_cross_entropy`.
"""

from cce_jax.api import filter_stats, linear_cross_entropy, resolve_impl
from cce_jax.block_sizes import BlockSizes
from cce_jax.loss_math import default_filter_eps
from cce_jax.stats import TokenStats, token_stats

__all__ = [
  "BlockSizes",
  "TokenStats",
  "default_filter_eps",
  "filter_stats",
  "linear_cross_entropy",
  "resolve_impl",
  "token_stats",
]
__version__ = "0.1.0"

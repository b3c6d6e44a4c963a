"""mc_jax: MegaContext for a frozen decoder LLM in JAX.

Data flow: tokens -> tree (gists per level) -> working context -> base model -> LensNet scores
-> focus allocator -> working context.
"""

__version__ = "0.1.0"

from mc_jax.api import MegaContext  # noqa: E402  (the public API; mc_jax/api.py)

__all__ = ["MegaContext", "__version__"]

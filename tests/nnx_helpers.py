"""Shared helpers for the GistNet / LensNet tests."""

import jax
import numpy as np
from flax import nnx


def rngs(seed):
    """Parameter RNG for tests: the rbg generator initialises ~2x faster than threefry on CPU."""
    return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


def run_unoptimised(f, *args):
    """jit(f)(*args) compiled at XLA optimisation level 0: ~40% less CPU compile time."""
    lowered = jax.jit(f).lower(*args)
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def assert_every_param_has_gradient(grads):
    """Every leaf of an nnx gradient state is finite and somewhere non-zero."""
    flat = nnx.to_flat_state(grads)
    assert len(flat) > 0
    for path, g in flat:
        g = np.asarray(g.get_value() if hasattr(g, "get_value") else g)
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), f"zero gradient for {path}"

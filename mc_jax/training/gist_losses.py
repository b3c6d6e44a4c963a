"""GistNet's loss terms beside the horizon NLL (SPEC §3): the neighbour cosine hinge, the KL to a
teacher's predictions, and the content hinge of the substitution windows.

Experiment-only variants (variance floor, InfoNCE, reconstruction through the base) live with
their experiment, experiments/gist_capacity/gist_objective.py, and enter the objective through
`TrainConfig.gist_terms`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kl_from_teacher(t_logits, s_logits):
    """Mean over positions of KL(teacher || student); the teacher gets no gradient."""
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(t_logits), -1)
    return jnp.sum(jnp.exp(t_logp) * (t_logp - jax.nn.log_softmax(s_logits, -1)), -1).mean()


def neighbour_cosine_hinge(g_NxD, margin: float):
    """Mean hinge relu(cos - margin) on the cosine of neighbouring gists of a sequence: keeps
    GistNet from writing one vector for every block (0 for a single block)."""
    gn = g_NxD / (jnp.linalg.norm(g_NxD, axis=-1, keepdims=True) + 1e-6)
    cos = jnp.sum(gn[1:] * gn[:-1], axis=-1)
    return jnp.mean(jax.nn.relu(cos - margin)) if g_NxD.shape[0] > 1 else 0.0


def content_hinge(nll_wrong_S, nll_right_S, margin: float):
    """Hinge relu(margin - (NLL(another block's gist) - NLL(the right gist))), mean over the S
    substitution windows: a gist has to beat another block's gist in its slot by `margin`."""
    return jnp.mean(jax.nn.relu(margin - (nll_wrong_S - nll_right_S)))

"""Context policies compared by the evaluation sweeps, all at one working-context budget W.

A policy decides what the frozen base model sees of a long history. Every policy has the same
two methods (`mc_jax.eval.policies.protocol.Policy`), so an evaluator never knows which one it
drives:

- `nll_stream(ids_N, blocks=None) -> nll_BxK` (float32 numpy): teacher-forced streaming. The
  document is cut into K-token blocks (K = 32); block b covers tokens [Kb, Kb+K). To score block b
  the policy builds its context from the history ids[:Kb] only, runs one forward of
  [context || block b], and returns the NLL of each of the block's K tokens (token Kb+j is
  predicted from the context plus block tokens < j). `blocks` lists the blocks to score (each
  >= 1 and complete; default: every complete block from 1). This is how the MegaContext runtime
  scores a block (refocus once per block), so base-only and MegaContext policies are comparable.
- `answer(history_ids, question, max_new_tokens, *, chat=True, answer_prefix=None,
  gold_blocks=None) -> str`:
  greedy generation after [head || policy's context of the history || tail]
  (`mc_jax.base.chat.build_prompt`): with the base's chat template, the user turn holds
  [context || question] and the assistant turn starts with the answer prefix; chat=False (or no
  template) appends [question || prefix] verbatim. The question is the newest raw tokens; a
  MegaContext policy ingests its first blocks before it answers, so its focus sees them.

  gold_blocks (keyword, optional): the history blocks that hold the answer, when the caller
  knows them; only `needle_oracle` reads them. After each answer the policy's `last_focus` says
  which history blocks the base read raw and, for a policy with a scorer, each block's score
  (`mc_jax.eval.policies.protocol.Policy.answer`).

Base-only policies (`mc_jax.eval.policies.window`): `full`, `truncate`, `sinks`. MegaContext
policies over the runtime (`mc_jax.eval.policies.megacontext`, `mc_jax.eval.policies.oracle`,
`mc_jax.eval.policies.retrieval`): `recency`, `meanpool`, `lens`, `oracle`, and the
training-free retrieval references `bm25` (BM25-ranked blocks kept raw) and `needle_oracle` (the
caller's gold blocks kept raw; answers only). A MegaContext policy whose trained networks are
missing raises `Unavailable`, and the sweep records an "unavailable: <reason>" row instead of a
number (`bm25` and `needle_oracle` take `gists="meanpool"` to run without them). `retrieve`
(`mc_jax.eval.policies.retrieve`, issue 19's training-free reference) finds blocks with the base's
own attention from the question and keeps them raw the same way; `lensq`
(`mc_jax.eval.policies.lensq`) ranks them with a question-aware LensNet fitted on retrieval
labels, which reads those attention scores and BM25 as features (Unavailable without its export).

Shape letters: N document tokens, B scored blocks, K block size.
"""

from __future__ import annotations

from typing import Callable

from mc_jax.errors import InputError, MissingResourceError
from mc_jax.eval.policies import window
from mc_jax.eval.policies.megacontext import MEGACONTEXT_POLICIES, make_megacontext_policy
from mc_jax.eval.policies.oracle import make_oracle_policy
from mc_jax.eval.policies.retrieval import RETRIEVAL_POLICIES, make_retrieval_policy
from mc_jax.eval.policies.lensq import make_lensq_policy
from mc_jax.eval.policies.retrieve import make_retrieve_policy
# K, NotApplicable and Unavailable are re-exported: evaluators and the sweep use them from here
from mc_jax.eval.policies.protocol import K, NotApplicable, Policy, Unavailable  # noqa: F401

MC_POLICIES = MEGACONTEXT_POLICIES + ("oracle", "retrieve", "lensq", "lensq_zoom") + \
    RETRIEVAL_POLICIES

_POLICIES: dict[str, Callable[..., Policy]] = {
    "truncate": window.TruncatePolicy,
    "sinks": window.SinksPolicy,
    "full": window.FullPolicy,
}


def register_policy(name: str):
    def deco(factory):
        _POLICIES[name] = factory
        return factory
    return deco


def policy_names() -> list[str]:
    return sorted(_POLICIES)


def make_policy(name: str, model, budget: int, checkpoint=None, **kw) -> Policy:
    """Build policy `name` at budget W; raises `Unavailable` for a policy that cannot exist yet."""
    if name not in _POLICIES:
        raise InputError(f"unknown policy {name!r}; known: {', '.join(policy_names())}")
    return _POLICIES[name](model, budget, checkpoint=checkpoint, **kw)


def _megacontext_factory(name: str):
    def factory(model, budget, checkpoint=None, **kw):
        try:
            if name == "oracle":
                return make_oracle_policy(model, budget, checkpoint=checkpoint, **kw)
            if name == "retrieve":
                return make_retrieve_policy(model, budget, checkpoint=checkpoint, **kw)
            if name in ("lensq", "lensq_zoom"):
                return make_lensq_policy(model, budget, checkpoint=checkpoint,
                                         **({"focus": "zoom"} if name == "lensq_zoom" else {}),
                                         **kw)
            if name in RETRIEVAL_POLICIES:
                return make_retrieval_policy(name, model, budget, checkpoint=checkpoint, **kw)
            return make_megacontext_policy(name, model, budget, checkpoint=checkpoint, **kw)
        except (NotImplementedError, MissingResourceError) as e:
            raise Unavailable(f"MegaContext policy {name!r}: {e}") from e
    factory.__doc__ = f"MegaContext policy {name!r} (Unavailable without its trained networks)."
    return factory


for _name in MC_POLICIES:
    register_policy(_name)(_megacontext_factory(_name))

"""What the evaluators of one sweep share: the base model (built on first use), cached policies,
and the tokenised documents the config names (paths relative to the config file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mc_jax.base.perplexity import read_text
from mc_jax.base.tiny import build_base
from mc_jax.errors import InputError
from mc_jax.eval.policies import registry as pol


class Context:
    """What evaluators share in one sweep: the base model (loaded on first use), policies, docs."""

    def __init__(self, cfg: dict, config_dir: Path):
        self.cfg = cfg
        self.config_dir = config_dir
        self.checkpoint = cfg.get("checkpoint")
        self.seed = int(cfg.get("seed", 0))
        self._model = None
        self._policies: dict = {}
        self._texts: dict = {}
        self.network_evals: dict = {}  # memo of mc_jax.eval.networks calls (one per sweep)

    @property
    def base_name(self) -> str:
        return str(self.cfg.get("base") or "smollm2-135m")

    @property
    def model(self):
        if self._model is None:
            self._model = build_base(self.cfg.get("base"), self.cfg.get("dtype"),
                                     self.cfg.get("base_kw"))
        return self._model

    def policy(self, name: str, budget: int, policy_kw: dict | None = None):
        """Cached policy instance (`full` ignores the budget and is shared across budgets);
        raises `pol.Unavailable` (cached too) for a MegaContext policy that cannot run (e.g. no
        trained networks for this base model)."""
        key = (name, None if name == "full" else int(budget))
        if key not in self._policies:
            try:
                self._policies[key] = pol.make_policy(name, self.model, int(budget),
                                                      checkpoint=self.checkpoint,
                                                      **(policy_kw or {}).get(name, {}))
            except pol.Unavailable as e:
                self._policies[key] = e
        p = self._policies[key]
        if isinstance(p, Exception):
            raise p
        return p

    def resolve(self, path) -> Path:
        p = Path(path)
        return p if p.is_absolute() else (self.config_dir / p).resolve()

    def text_ids(self, path) -> np.ndarray:
        p = self.resolve(path)
        if p not in self._texts:
            self._texts[p] = np.asarray(self.model.tokenizer.encode(read_text(p)), np.int32)
        return self._texts[p]

    def doc_ids(self, doc: dict) -> np.ndarray:
        """Tokens [offset, offset + tokens) of a document file; too short a file is an error."""
        ids = self.text_ids(doc["path"])
        lo, n = int(doc.get("offset", 0)), int(doc["tokens"])
        if lo + n > len(ids):
            raise InputError(f"document {doc['name']!r}: {doc['path']} has {len(ids)} tokens, the "
                             f"config asks for [{lo}, {lo + n}); lower offset/tokens")
        return ids[lo:lo + n]

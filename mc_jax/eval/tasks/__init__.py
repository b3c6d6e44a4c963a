"""Retrieval task generators: RULER-lite (`ruler`), the passkey and planted facts (`planted`), built
on token-exact history layouts (`assembly`); `generate` / `grid` (`api`) make `Case`s (`case`).
Pure Python + numpy, deterministic by seed, any tokenizer with encode / decode, no downloads."""

from mc_jax.eval.tasks.api import case_seed, generate, grid, resolve, task_names
from mc_jax.eval.tasks.assembly import (BLOCK_SIZE, Needle, blocks_of, read_haystack,
                                        split_sentences, straddles)
from mc_jax.eval.tasks.case import (METRICS, TASKS, Case, string_match_all, string_match_part)
from mc_jax.eval.tasks.ruler import RULER_VARIANTS

__all__ = ["BLOCK_SIZE", "Case", "METRICS", "Needle", "RULER_VARIANTS", "TASKS", "blocks_of",
           "case_seed", "generate", "grid", "read_haystack", "resolve", "split_sentences",
           "straddles", "string_match_all", "string_match_part", "task_names"]

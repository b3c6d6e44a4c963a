"""The `mc-jax` command."""
from mc_jax.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]

"""`python -m mc_jax.cli ...` is `mc-jax ...`."""
import sys

from mc_jax.cli import main

sys.exit(main())

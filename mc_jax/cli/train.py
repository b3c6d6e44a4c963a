"""`mc-jax train` and `mc-jax fit-lens`: the command-line ends of `training.loop.run` and of the
offline LensNet fit (`training.lens_fit`). Their arguments are declared in
`training.config.add_train_args` and `cli.commands` (which builds the parser without importing
JAX)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mc_jax.base.loading import load_base
from mc_jax.nets.io import default_checkpoint
from mc_jax.training.config import load_config
from mc_jax.training.lens_fit import collect, export_fit, fit, load_labels, load_models
from mc_jax.training.loop import maybe_init_distributed, run


def train_cli(args) -> int:
    maybe_init_distributed()
    cfg = load_config(args.config, args.set)
    summary = run(cfg, args.workdir, resume=args.resume, steps=args.steps,
                  n_devices=args.devices, progress=not args.no_progress, export=args.export)
    print(json.dumps(summary))
    return 0


def fit_lens_cli(args) -> int:
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint or default_checkpoint())
    model = load_base(args.base)
    m, gist_state, _, info = load_models(model, ckpt, args.mixtures, args.edits)
    paths = collect(model, m, gist_state, workdir, args.windows, shard=args.shard,
                    seed=args.seed, data_dir=args.data_dir, progress=not args.no_progress,
                    log=log, base_id=str(info.get("base", "")))
    labels = load_labels(paths)
    m, lens_state, summary = fit(m, labels, steps=args.steps, batch=args.batch, lr=args.lr,
                                 val_frac=args.val_frac, seed=args.seed, workdir=workdir,
                                 progress=not args.no_progress)
    summary.update(checkpoint=str(ckpt), workdir=str(workdir))
    if args.export:
        export_fit(Path(args.export), m, gist_state, lens_state, info,
                   dict(summary, mixtures=args.mixtures, edits=args.edits, seed=args.seed,
                        command="mc-jax " + " ".join(sys.argv[1:])))
        summary["exported"] = str(args.export)
    print(json.dumps(summary))
    return 0

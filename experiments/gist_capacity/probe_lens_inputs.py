"""Does LensNet rank the stage-2 GistNet's edits better when it reads the blocks' content?

The stage-2 GistNet (`recon_stage2_pair/`) is a better placeholder for the frozen base than the
shipped one, but a LensNet fitted on its gists ranks single edits less well than the shipped pair
(Spearman +0.200, window interval [-0.026, +0.380] on 24 validation windows, vs +0.268 [+0.096,
+0.433]). One reading: training for the base drove the blocks' content out of the gists (the
linear read-out probe, `probe_gist_content.py`), and LensNet ranks an expansion by that content.

This probe keeps everything of `mc-jax fit-lens` / `mc-jax eval-lens` (the same 4,608 measured
utilities, the same fit, the same 24 validation windows and edits, utilities always measured with
the stage-2 GistNet's gists in the base's context) and changes only what LensNet *reads* for each
node: `--inputs gist` (the GistNet's gists: reproduces the fit-lens figure) or `--inputs mean`
(the mean of the node's token embeddings: a summary that keeps the content). If `mean` ranks
clearly better, LensNet needs a content channel next to the gist, not a better gist.

    .venv/bin/python experiments/gist_capacity/probe_lens_inputs.py --inputs mean \
        --out experiments/results/networks/probe_lens_inputs_mean.json

The label shards must already be in --workdir (`mc-jax fit-lens ... --workdir runs/lens_fit_recon
--windows 192`); their windows are drawn again from the same seeds, and the regenerated gists are
checked against the stored ones before anything else, so a mismatch cannot pass silently.
"""
import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mc_jax.base import base_model as bm
from mc_jax.data import pipeline as data
from mc_jax.training import lens_fit
from mc_jax.training.forward import build_gists
from mc_jax.training.models import Models
from mc_jax.eval.networks import _validation_windows
from mc_jax.stats import bootstrap_spearman, spearman
from mc_jax.nets.gistnet import as_gist_fn
from mc_jax.base.loading import load_base

ap = argparse.ArgumentParser()
ap.add_argument("--checkpoint", default="experiments/gist_capacity/recon_stage2_pair")
ap.add_argument("--workdir", default="runs/lens_fit_recon")
ap.add_argument("--windows", type=int, default=192)
ap.add_argument("--inputs", choices=["gist", "mean"], default="mean")
ap.add_argument("--docs", type=int, default=24)
ap.add_argument("--steps", type=int, default=1500)
ap.add_argument("--out", default=None)
args = ap.parse_args()

model = load_base(None)
m, gist_state, _, info = lens_fit.load_models(model, Path(args.checkpoint), 3, 8)
pc = m.pack
C, H, K, N = pc.seq_len, pc.horizon, pc.block_size, pc.seq_blocks
gist_model = nnx.merge(m.gist_graph, gist_state)


def _emb(ids_C):
    return bm.embed_tokens(model.params, ids_C).reshape(N, K, -1).astype(jnp.float32)


@jax.jit
def stage2_gists(ids_C):
    return build_gists(as_gist_fn(gist_model), _emb(ids_C), pc.depth)


@jax.jit
def summaries(ids_C):
    """(gist1, gist2): the GistNet's gists, or the means of the nodes' token embeddings."""
    if args.inputs == "gist":
        return stage2_gists(ids_C)
    g1 = _emb(ids_C).mean(1)
    return g1, g1.reshape(N // K, K, -1).mean(1)


# 1. the measured labels, with what LensNet reads replaced (windows regenerated from the seeds
#    `lens_fit.collect` used, and checked against the stored gists)
paths = lens_fit.collect(model, m, gist_state, Path(args.workdir), args.windows, seed=0,
                         progress=False, log=lambda s: print(s, file=sys.stderr),
                         base_id=str(info.get("base", "")))
labels = lens_fit.load_labels(paths)
src = data.open_split("train", model.tokenizer)
g1s, g2s, worst = [], [], 0.0
for j in tqdm(range(len(paths)), desc="regenerate windows", file=sys.stderr):
    it = lens_fit.shard_windows(src, pc, 0, j)
    for i in range(8):
        ids = jnp.asarray(np.asarray(next(it)["tokens"])[0][:C])
        ref = np.asarray(stage2_gists(ids)[0])
        worst = max(worst, float(np.abs(ref - labels["gist1"][8 * j + i]).max()))
        a, b = summaries(ids)
        g1s.append(np.asarray(a))
        g2s.append(np.asarray(b))
print(f"[probe] regenerated windows: max |gist1 - stored gist1| = {worst:.2e}", file=sys.stderr)
if worst > 1e-3:
    raise SystemExit("the regenerated windows are not the ones the label shards were measured "
                     "on; refusing to mix them")
labels["gist1"], labels["gist2"] = np.stack(g1s), np.stack(g2s)

# 2. the fit, exactly as fit-lens runs it
fit_dir = Path(args.workdir) / f"probe_{args.inputs}"
fit_dir.mkdir(parents=True, exist_ok=True)
m2, lens_state, summ = lens_fit.fit(m, labels, steps=args.steps, batch=8, lr=1e-3, val_frac=0.1,
                                    seed=0, workdir=fit_dir)

# 3. eval-lens on the validation windows: utilities measured with the stage-2 gists in the base's
#    context (as always), scores from LensNet reading the chosen inputs
# eval-lens measures 2 mixtures x 8 edits per window (its defaults), so the same edits here
m_eval, _, _, _ = lens_fit.load_models(model, Path(args.checkpoint), 2, 8)
m_eval = Models(**{**m_eval.__dict__, "lens_graph": m2.lens_graph})
measure = lens_fit.measure_fn(model, m_eval, gist_state)
score = jax.jit(lambda ls, lab: lens_fit.edit_scores_of(ls, lab, m_eval))
windows = _validation_windows(model.tokenizer, C + H, args.docs, 0)
us, ds, win = [], [], []
for i, w in enumerate(tqdm(windows, desc="eval", file=sys.stderr)):
    lab = dict(measure(jnp.asarray(w), jax.random.PRNGKey(i)))
    lab["gist1"], lab["gist2"] = summaries(jnp.asarray(w[:C]))
    u, d = map(np.asarray, score(lens_state, lab))
    v = np.asarray(lab["evalid"])
    us += list(u[v])
    ds += list(d[v])
    win += [i] * int(v.sum())
res = dict(inputs=args.inputs, spearman=spearman(us, ds),
           spearman_ci95=bootstrap_spearman(us, ds), spearman_ci95_windows=bootstrap_spearman(
               us, ds, win), n_edits=len(us), n_windows=len(windows), fit=summ,
           checkpoint=args.checkpoint, labels=summ["labels"])
print(json.dumps(res))
if args.out:
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")

"""Can the frozen base read a block's content from one *token embedding* in the block's place?

A repeat of `../train_gist_subst/probe_single_vector.py` (8 windows, rules last / first / most
surprising / farthest from the mean) on eval-gists' own windows and blocks, with a corpus-rarity
rule and, new here, a content control. No training. A "token gist" stands in for a LOD1 block, chosen by a fixed rule from the block's
own tokens, and is scored exactly as `mc-jax eval-gists` scores GistNet (same validation windows,
W = 512, H = 64, blocks 4 / 10 / 13 / 14, paired differences):

- `rarest`: the embedding of the block's rarest token (unigram counts over train windows; ties go
  to the later token), i.e. usually a name or content word the base knows natively;
- `rare3`: the mean of the embeddings of the block's three rarest tokens;
- `last`: the embedding of the block's last token;
- `rarest_shuffled`: `rarest` taken from the next window's block in the same place (content
  control: same kind of vector, other text);
- `drop` and `untrained` (an untrained GistNet), the eval's own baselines.

If `rarest` beats `drop` and `rarest_shuffled`, a frozen base reads real content from a gist that
looks like a token, and a GistNet that learns to *pick* tokens has content the base can use.

    .venv/bin/python experiments/gist_capacity/probe_token_gists.py --docs 12 \
        --out experiments/gist_capacity/token_gists.json
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mc_jax.base import base_model as bm
from mc_jax.data import pipeline as data
from mc_jax.eval.networks import (_gist_variants, _validation_windows, raw_nll,
                                  substitution_nll)
from mc_jax.nets.io import default_checkpoint, load_networks
from mc_jax.base.loading import load_base

ap = argparse.ArgumentParser()
ap.add_argument("--docs", type=int, default=12)
ap.add_argument("--count-windows", type=int, default=300,
                help="train windows of 2048 tokens for the unigram counts")
ap.add_argument("--out", default=None)
a = ap.parse_args()
K, H, W, BLOCKS = 32, 64, 512, [4, 10, 13, 14]
model = load_base(None)
V = model.cfg.vocab_size
counts = np.zeros(V, np.int64)
it = data.make_batch_iterator(data.open_split("train", model.tokenizer),
                              data.WindowConfig(2048, 1, seed=123))
for _ in range(a.count_windows):
    counts += np.bincount(np.asarray(next(it)["tokens"]).ravel(), minlength=V)
rarity = -np.log1p(counts)
emb_table = np.asarray(model.params["embed"], np.float32)


def token_gists(ids_C, rule):
    blocks = ids_C.reshape(-1, K)
    out = []
    for blk in blocks:
        r = rarity[blk] + 1e-6 * np.arange(K)          # ties: the later token
        order = np.argsort(-r)
        if rule == "rarest":
            out.append(emb_table[blk[order[0]]])
        elif rule == "rare3":
            out.append(emb_table[blk[order[:3]]].mean(0))
        elif rule == "last":
            out.append(emb_table[blk[-1]])
    return jnp.asarray(np.stack(out))


gist, _, _ = load_networks(default_checkpoint(), model.cfg)
untrained = jax.jit(lambda lv, x, g=_gist_variants(gist)["untrained"]: g(lv, x), static_argnums=0)
windows = _validation_windows(model.tokenizer, W + H, a.docs, 0, None)
arms = ["drop", "untrained", "last", "rarest", "rare3", "rarest_shuffled"]
rows = {k: [] for k in arms}
for i, ids in enumerate(tqdm(windows, desc="token gists")):
    ids = np.asarray(ids)
    r = raw_nll(model.params, model.cfg, ids, H)
    other = np.asarray(windows[(i + 1) % len(windows)])

    def sub(fn, **kw):
        return substitution_nll(model.params, model.cfg, fn, ids, level=1, blocks=BLOCKS,
                                horizon=H, adapter=None, **kw) - r

    rows["drop"] += list(sub(untrained, drop=True))
    rows["untrained"] += list(sub(untrained))
    for rule in ("last", "rarest", "rare3"):
        G = token_gists(ids[:W], rule)
        rows[rule] += list(sub(lambda lv, x, G=G: G))
    G = token_gists(other[:W], "rarest")
    rows["rarest_shuffled"] += list(sub(lambda lv, x, G=G: G))

out = {k: float(np.mean(v)) for k, v in rows.items()}
per_block = {k: np.asarray(v).reshape(-1, len(BLOCKS)).mean(0).round(4).tolist()
             for k, v in rows.items()}
for x, y in [("rarest", "drop"), ("rarest", "untrained"), ("rarest", "rarest_shuffled"),
             ("rare3", "drop"), ("last", "drop"), ("untrained", "drop")]:
    d = np.asarray(rows[x]) - np.asarray(rows[y])
    out[f"{x}_minus_{y}"] = float(d.mean())
    out[f"{x}_minus_{y}_sem"] = float(d.std(ddof=1) / np.sqrt(len(d)))
out["per_block"] = per_block
out["blocks"] = BLOCKS
out["docs"] = a.docs
print(json.dumps(out, indent=1))
if a.out:
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)

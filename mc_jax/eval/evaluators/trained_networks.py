"""What `gist_dnll` and `lens_rank` share: they measure the trained networks with
`mc_jax.eval.networks` (`eval_gists`, `eval_lens`) on held-out validation windows of the prepared
corpus, one memoised call serving every row of a sweep."""

from __future__ import annotations

from pathlib import Path

from mc_jax.errors import ConfigError
from mc_jax.eval import networks as eval_networks
from mc_jax.eval.context import Context
from mc_jax.eval.policies import registry as pol
from mc_jax.nets.io import default_checkpoint

SOURCE = "eval_networks"


def check_source(ecfg: dict) -> None:
    """The evaluator's config entry names the one source there is (`source="eval_networks"`,
    the default)."""
    source = ecfg.get("source", SOURCE)
    if source != SOURCE:
        raise ConfigError(f"evaluator {ecfg['name']}: source {source!r} does not exist; the "
                          f"trained networks are measured by mc_jax.eval.networks "
                          f"(source={SOURCE!r})")


def run_eval_networks(ctx: Context, fn_name: str, **kw) -> dict:
    """`mc_jax.eval.networks.eval_gists / eval_lens` (held-out validation windows of the prepared
    corpus, trained networks from `checkpoint`), memoised per call: one call serves every row."""
    if ctx.cfg.get("base") == "tiny":
        raise pol.Unavailable("eval_networks needs the real base model, not the tiny random one")
    ckpt = ctx.checkpoint or default_checkpoint()
    if not (Path(ckpt) / "networks.json").exists():
        raise pol.Unavailable(f"no trained networks at {ckpt} (give --checkpoint DIR, an "
                              "export_networks directory)")
    key = (fn_name, str(ckpt), tuple(sorted(kw.items())))
    if key not in ctx.network_evals:
        evaluate = getattr(eval_networks, fn_name)
        ctx.network_evals[key] = evaluate(str(ckpt), base=ctx.cfg.get("base"), progress=False,
                                          **kw)
    return ctx.network_evals[key]

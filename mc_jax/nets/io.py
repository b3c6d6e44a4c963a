"""GistNet + LensNet on disk: the exported pair (safetensors + networks.json), the shipped default,
and what the runtime loads when no trained pair is there (mean-pool gists, no LensNet).

An export directory holds `networks.safetensors` (keys `gist/...` and `lens/...`, see
`flat_key`) and `networks.json` (`gist_config`, `lens_config`, `dtype`, `checksum_sha256` and
whatever the writer adds, e.g. the training config and step). The checksum covers the tensors
and the rest of networks.json (`checksum`); loading verifies it (exports written before it was
recorded load unchecked) and every config field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.errors import ConfigError, CorruptFileError, McJaxError, MissingResourceError
from mc_jax.nets.gistnet import GistNetConfig, build_gist_model
from mc_jax.nets.lensnet import LensNet, LensNetConfig

DEFAULT_NETWORKS = Path(__file__).parents[1] / "assets" / "cpu_small"


def default_checkpoint() -> Path:
    """The shipped pair for SmolLM2-135M (`mc_jax/assets/cpu_small`)."""
    return DEFAULT_NETWORKS


def flat_key(name: str, keypath) -> str:
    """'gist/cores/0/...': the safetensors key of one network parameter."""
    return name + "/" + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)


CHECKSUM_KEY = "checksum_sha256"


def checksum(raw_safetensors: bytes, info: dict) -> str:
    """sha256 of networks.safetensors followed by the rest of networks.json (sorted keys)."""
    rest = {k: v for k, v in info.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(raw_safetensors + json.dumps(rest, sort_keys=True).encode()).hexdigest()


def save_networks(path: Path, gist_state, lens_state, gist_cfg: GistNetConfig,
                  lens_cfg: LensNetConfig, meta: dict, dtype="bfloat16") -> None:
    """Small standalone checkpoint of GistNet + LensNet parameter states (nnx.State)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {}
    for name, st in (("gist", gist_state), ("lens", lens_state)):
        for kp, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(st))[0]:
            arr = np.asarray(jax.device_get(v), np.float32)
            flat[flat_key(name, kp)] = arr.astype(jnp.dtype(dtype)) if dtype != "float32" else arr
    tmp = path / "networks.safetensors.tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(tmp))
    info = json.loads(json.dumps(dict(meta, gist_config=dataclasses.asdict(gist_cfg),
                                      lens_config=dataclasses.asdict(lens_cfg), dtype=dtype),
                                 default=str))  # as a reader will see it
    info[CHECKSUM_KEY] = checksum(tmp.read_bytes(), info)
    tmp.replace(path / "networks.safetensors")
    tmp_json = path / "networks.json.tmp"
    tmp_json.write_text(json.dumps(info, indent=2))
    os.replace(tmp_json, path / "networks.json")


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
          "tuple": (list, tuple)}


def config_from_json(cls, d, where: str):
    """A GistNetConfig / LensNetConfig from networks.json, every field checked: unknown,
    missing or mistyped fields and impossible values are a CorruptFileError naming them."""
    if not isinstance(d, dict):
        raise CorruptFileError(f"{where} is not an object (got {type(d).__name__})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise CorruptFileError(f"{where} has unknown field(s) {', '.join(unknown)}; the file "
                               "was edited or written by another mc_jax version")
    missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING]
    if missing:
        raise CorruptFileError(f"{where} lacks field(s) {', '.join(missing)}")
    for n, v in d.items():
        typ = fields[n].type if isinstance(fields[n].type, str) else fields[n].type.__name__
        ok = _TYPES.get(typ, (object,))
        if not isinstance(v, ok) or (isinstance(v, bool) and bool not in ok):
            raise CorruptFileError(f"{where}.{n} must be {typ}, got {v!r}")
    try:
        return cls(**d)
    except (McJaxError, TypeError, ValueError) as e:
        raise CorruptFileError(f"{where}: {e}") from e


def read_networks(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(networks.json as a dict, the flat tensors) of an export, its checksum verified."""
    from safetensors.numpy import load_file

    path = Path(path)
    jf, sf = path / "networks.json", path / "networks.safetensors"
    for f in (jf, sf):
        if not f.is_file():
            raise MissingResourceError(f"{path} is not a GistNet/LensNet checkpoint: {f.name} is "
                                       "missing (`mc-jax train --export` or `mc-jax fit-lens` "
                                       "writes both files)")
    try:
        info = json.loads(jf.read_text())
    except (ValueError, OSError) as e:
        raise CorruptFileError(f"{jf} is not valid JSON ({e}); the export is damaged") from e
    if not isinstance(info, dict):
        raise CorruptFileError(f"{jf} is not a JSON object; the export is damaged")
    raw = sf.read_bytes()
    want = info.get(CHECKSUM_KEY)  # None: written before checksums were recorded
    if want is not None and checksum(raw, info) != want:
        raise CorruptFileError(f"{path}: networks.safetensors and networks.json do not match "
                               f"the {CHECKSUM_KEY} in networks.json: a file is damaged or was "
                               "edited; export the networks again (or restore a copy)")
    try:
        flat = load_file(str(sf))  # (`load(raw)` cannot read bfloat16)
    except Exception as e:  # safetensors raises SafetensorError / ValueError on damage
        raise CorruptFileError(f"{sf} is not a readable safetensors file ({e})") from e
    return info, flat


def load_networks(path: str | Path, base_cfg: bm.LlamaConfig | None = None):
    """(gist model, lens model, info) from a `save_networks` directory."""
    path = Path(path)
    info, flat = read_networks(path)
    where = path / "networks.json"
    gcfg = config_from_json(GistNetConfig, info.get("gist_config"), f"{where}: gist_config")
    lcfg = config_from_json(LensNetConfig, info.get("lens_config"), f"{where}: lens_config")
    if base_cfg is not None and gcfg.d_model != base_cfg.d_model:
        raise ConfigError(f"{path} was trained for d_model {gcfg.d_model}, the base has "
                          f"{base_cfg.d_model}")
    gist = build_gist_model(gcfg, rngs=nnx.Rngs(0))
    lens = LensNet(lcfg, rngs=nnx.Rngs(0))
    for name, mod in (("gist", gist), ("lens", lens)):
        fill_params(mod, name, flat, CorruptFileError, f"{path}: parameter")
    bad = [k for k, v in flat.items() if not np.all(np.isfinite(v.astype(np.float32)))]
    if bad:
        raise CorruptFileError(f"{path}: parameter {bad[0]} holds NaN or inf values")
    return gist, lens, info


def fill_params(mod, name: str, flat: dict, error, what: str):
    """Set every nnx.Param of `mod` from the flat safetensors dict (keys from `flat_key`)."""
    st = nnx.state(mod, nnx.Param)
    pure = nnx.to_pure_dict(st)
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    new = []
    for kp, v in leaves:
        key = flat_key(name, kp)
        if key not in flat or flat[key].shape != v.shape:
            got = "missing" if key not in flat else f"shape {tuple(flat[key].shape)}"
            raise error(f"{what} {key} ({got}, this run needs {tuple(v.shape)})")
        new.append(jnp.asarray(flat[key], jnp.float32))
    nnx.replace_by_pure_dict(st, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(pure),
                                                              new))
    nnx.update(mod, st)


def load_nets(base_model, checkpoint=None, *, need_trained: bool, depth: int = 2, log=None,
              meanpool: bool = False):
    """(gist model, lens model or None, info). checkpoint None -> the shipped default.

    With no networks there: MissingResourceError if need_trained, else mean-pool gists (and
    no LensNet), announced through `log`.
    """
    path = Path(checkpoint) if checkpoint else default_checkpoint()
    if checkpoint and not path.exists():
        raise MissingResourceError(f"checkpoint {path} not found (no such file or folder); give "
                                   "an exported GistNet/LensNet directory, or none for the "
                                   "shipped pair")
    if meanpool:
        log = None
    elif (path / "networks.json").is_file():
        try:
            gist, lens, info = load_networks(path, base_model.cfg)
        except ConfigError as e:  # trained for another base: no networks for this one
            raise MissingResourceError(f"no trained networks for this base model: {e}") from e
        return gist, lens, dict(info, checkpoint=str(path))
    if not meanpool and checkpoint and path.exists():
        raise MissingResourceError(f"{path} has no networks.json: not an exported GistNet/"
                                   "LensNet checkpoint (`mc-jax train --export` or "
                                   "`mc-jax fit-lens` writes one)")
    if need_trained and not meanpool:
        raise MissingResourceError(
            f"trained GistNet/LensNet not found at {path}; train and export them "
            "(mc-jax train) or pass --checkpoint")
    if log:
        log(f"[mc-jax] no trained networks at {path}: using mean-pool gists and the recency "
            "policy (no LensNet)")
    gcfg = GistNetConfig(d_model=base_model.cfg.d_model, depth=depth, kind="mean_pool",
                         embed_rms=bm.embedding_rms(base_model.params))
    return build_gist_model(gcfg, rngs=nnx.Rngs(0)), None, {"checkpoint": None}

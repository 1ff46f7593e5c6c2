"""Input corpora → raw records: .txt, .jsonl, .jsonl.zst, .parquet and ``datasets.save_to_disk`` folders.

The reading side stays cheap (bytes and strings, no JSON parsing, no decoding of .txt bytes) so that one
process can feed several tokenizing workers; :func:`parse_record` does the per-record work in the workers.
Every record carries a stable ``index`` (line, row or blank-line-separated block number within its input,
0-based; 0 for a whole .txt file) that names the document in the train/val split hash, and a 1-based
``line`` for error reports (the row number for parquet and arrow).
"""

from __future__ import annotations

import glob
import io
import json
import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import orjson

__all__ = ["InputError", "InputFile", "Record", "BadRecord", "expand_inputs", "iter_records", "parse_record"]

_SUFFIXES = (".jsonl.zst", ".jsonl", ".txt", ".parquet")
_GLOB_CHARS = "*?["


class InputError(ValueError):
    """An input cannot be used at all (missing, unreadable, wrong format or column); names the file."""


@dataclass(frozen=True)
class InputFile:
    """One input: ``path`` absolute; ``key`` the path relative to the argument it came from (the document
    key prefix, independent of where the corpus lives); ``kind`` one of txt, jsonl, jsonl.zst, parquet,
    arrow (a ``datasets.save_to_disk`` folder)."""

    path: str
    key: str
    kind: str


class Record(NamedTuple):
    """A raw document: ``payload`` is bytes (a jsonl line, or .txt bytes still to decode), a str (a parquet
    or arrow cell) or None (a null cell). A tuple: millions are made and sent to workers."""

    index: int
    line: int
    payload: bytes | str | None


@dataclass(frozen=True)
class BadRecord:
    """A record that yields no document. ``reason``: malformed_json, missing_field, empty, undecodable."""

    reason: str
    line: int
    detail: str


def _kind(path: str) -> str | None:
    if os.path.isdir(path):
        return "arrow" if os.path.isfile(os.path.join(path, "state.json")) else None
    for suffix in _SUFFIXES:
        if path.endswith(suffix):
            return suffix.lstrip(".")
    return None


def _walk(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if os.path.isfile(os.path.join(dirpath, "state.json")):
            found.append(dirpath)
            dirnames.clear()
            continue
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _kind(f)]
    return found


def expand_inputs(patterns: list[str]) -> list[InputFile]:
    """Expand files, globs (``**`` recurses) and folders (searched recursively for supported files and
    ``datasets`` folders) into inputs, sorted within each argument, duplicates dropped.

    Raises ValueError naming the argument when it matches nothing or names an unsupported file."""
    inputs: list[InputFile] = []
    seen: set[str] = set()
    for pattern in patterns:
        if any(c in pattern for c in _GLOB_CHARS):
            cut = min(pattern.find(c) for c in _GLOB_CHARS if c in pattern)
            base = os.path.dirname(pattern[:cut]) or "."
            paths = sorted(p for p in glob.glob(pattern, recursive=True) if _kind(p))
        elif os.path.isdir(pattern) and not _kind(pattern):
            base, paths = pattern, _walk(pattern)
        elif os.path.exists(pattern):
            if not _kind(pattern):
                raise InputError(f"input {pattern}: unsupported format (use .txt, .jsonl, .jsonl.zst, .parquet or a "
                                 "datasets.save_to_disk folder)")
            base, paths = os.path.dirname(pattern) or ".", [pattern]
        else:
            raise InputError(f"input {pattern}: no such file or folder")
        if not paths:
            raise InputError(f"input {pattern}: matches no .txt, .jsonl, .jsonl.zst, .parquet or datasets folder")
        for p in paths:
            absolute = os.path.abspath(p)
            if absolute not in seen:
                seen.add(absolute)
                key = os.path.relpath(absolute, os.path.abspath(base)).replace(os.sep, "/")
                inputs.append(InputFile(path=absolute, key=key, kind=_kind(p)))
    return inputs


def _lines(f: io.BufferedIOBase) -> Iterator[Record]:
    for i, line in enumerate(f):
        yield Record(index=i, line=i + 1, payload=line)


def _txt_blocks(data: bytes) -> Iterator[Record]:
    """Blocks of non-blank lines; a block's text is its lines with the last line ending removed."""
    block: list[bytes] = []
    start, number = 0, 0
    for i, line in enumerate(data.splitlines(keepends=True)):
        if line.strip():
            if not block:
                start = i
            block.append(line)
        elif block:
            yield _block_record(block, number, start)
            block, number = [], number + 1
    if block:
        yield _block_record(block, number, start)


def _block_record(block: list[bytes], number: int, start: int) -> Record:
    text = b"".join(block)
    text = text[:-2] if text.endswith(b"\r\n") else text[:-1] if text.endswith((b"\n", b"\r")) else text
    return Record(index=number, line=start + 1, payload=text)


def _columns(batches, text_field: str, path: str) -> Iterator[Record]:
    row = 0
    for batch in batches:
        if text_field not in batch.schema.names:
            raise InputError(f"input {path}: no column {text_field!r} (columns: {', '.join(batch.schema.names)}); "
                             "pass --text-field")
        for value in batch.column(text_field).to_pylist():
            yield Record(index=row, line=row + 1, payload=value)
            row += 1


def _arrow_batches(folder: str):
    import pyarrow as pa

    with open(os.path.join(folder, "state.json")) as f:
        files = [d["filename"] for d in json.load(f).get("_data_files", [])]
    if not files:
        raise InputError(f"input {folder}: state.json lists no _data_files")
    for name in files:
        with pa.memory_map(os.path.join(folder, name)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
                continue
            yield from reader


def iter_records(inp: InputFile, *, text_field: str, txt_blocks: bool) -> Iterator[Record]:
    """Raw records of one input, in file order. Raises :class:`InputError` naming the file when it cannot be
    read (permissions, corrupt compression or parquet, no such column); bad *records* are left to
    :func:`parse_record`."""
    try:
        if inp.kind == "txt":
            with open(inp.path, "rb") as f:
                data = f.read()
            yield from _txt_blocks(data) if txt_blocks else [Record(index=0, line=1, payload=data)]
        elif inp.kind == "jsonl":
            with open(inp.path, "rb") as f:
                yield from _lines(f)
        elif inp.kind == "jsonl.zst":
            import zstandard

            with open(inp.path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as z:
                yield from _lines(io.BufferedReader(z))
        elif inp.kind == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(inp.path)
            if text_field not in pf.schema_arrow.names:
                raise InputError(f"input {inp.path}: no column {text_field!r} (columns: "
                                 f"{', '.join(pf.schema_arrow.names)}); pass --text-field")
            yield from _columns(pf.iter_batches(batch_size=1024, columns=[text_field]), text_field, inp.path)
        else:
            yield from _columns(_arrow_batches(inp.path), text_field, inp.path)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read the file itself is fatal, with its name
        raise InputError(f"input {inp.path}: cannot read it ({type(e).__name__}: {e})") from e


def parse_record(rec: Record, *, kind: str, text_field: str) -> str | BadRecord:
    """The document text of a record, or why there is none (empty means no non-whitespace character)."""
    payload = rec.payload
    if kind in ("jsonl", "jsonl.zst"):
        payload = _json_text(rec, text_field)
        if isinstance(payload, BadRecord):
            return payload
    elif isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            line = rec.line + payload[: e.start].count(b"\n")
            return BadRecord("undecodable", line, f"invalid UTF-8 at byte {e.start}")
    elif payload is None:
        return BadRecord("missing_field", rec.line, f"{text_field!r} is null")
    if not payload.strip():
        return BadRecord("empty", rec.line, "no non-whitespace text")
    return payload


def _json_text(rec: Record, text_field: str) -> str | BadRecord:
    """The text field of a JSON line. orjson parses the good lines (several times faster than ``json``); a line
    it rejects is parsed again by ``json`` so that the verdict and its message follow the standard library."""
    try:
        obj = orjson.loads(rec.payload)
    except orjson.JSONDecodeError:
        try:
            obj = json.loads(rec.payload)
        except UnicodeDecodeError as e:
            return BadRecord("undecodable", rec.line, str(e))
        except ValueError as e:
            if not rec.payload.strip():
                return BadRecord("empty", rec.line, "blank line")
            return BadRecord("malformed_json", rec.line, str(e))
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if isinstance(text, str):
            try:  # json accepts escaped lone surrogates, which are no text the tokenizer can take
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                return BadRecord("undecodable", rec.line, f"lone surrogate escape at character {e.start}")
    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
        got = "not an object" if not isinstance(obj, dict) else f"{text_field!r} missing or not a string"
        return BadRecord("missing_field", rec.line, got)
    return obj[text_field]

"""``ratplus prep tokenizer`` / ``prep shards``: contents against sentencepiece run directly on the documents."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from tests.data.data_helpers import EOS, expected_stream, in_val, make_docs, prep, read_windows, stream_of, write_jsonl

SEQ = 64


def _decode_docs(sp, stream: np.ndarray) -> list[str]:
    """Complete documents (those followed by EOS) of a token stream, decoded."""
    ends = np.flatnonzero(stream == EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [sp.decode(stream[s:e].tolist()) for s, e in zip(starts, ends)]


def _write_all_formats(root, docs: list[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The documents spread over every input format; returns (path, [(key, text)]) per input, input order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    parts = [docs[:40], docs[40:80], docs[80:120], docs[120:160], docs[160:170], docs[170:200]]
    (root / "c").mkdir()
    write_jsonl(root / "c" / "a.jsonl", parts[0])
    with open(root / "c" / "b.jsonl.zst", "wb") as f:
        jsonl = "".join(json.dumps({"text": d}) + "\n" for d in parts[1])
        f.write(zstandard.ZstdCompressor().compress(jsonl.encode()))
    pq.write_table(pa.table({"text": parts[2], "id": list(range(40))}), root / "c" / "c.parquet", row_group_size=7)
    arrow = root / "c" / "d_arrow"
    arrow.mkdir()
    with pa.OSFile(str(arrow / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as writer:
            writer.write_table(pa.table({"text": parts[3]}))
    (arrow / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    for i, d in enumerate(parts[4]):
        (root / "c" / f"e{i}.txt").write_bytes(d.encode())
    # blocks: single-line documents separated by blank lines (one of them whitespace-only)
    blocks = [d.replace("\r", "").replace("\n", " ").strip() for d in parts[5]]
    text = "\n\n".join(blocks[:15]).encode() + b"\n \n\n" + "\n\n".join(blocks[15:]).encode()
    (root / "c" / "f.txt").write_bytes(text)
    return [("a.jsonl", [(f"a.jsonl:{i}", d) for i, d in enumerate(parts[0])]),
            ("b.jsonl.zst", [(f"b.jsonl.zst:{i}", d) for i, d in enumerate(parts[1])]),
            ("c.parquet", [(f"c.parquet:{i}", d) for i, d in enumerate(parts[2])]),
            ("d_arrow", [(f"d_arrow:{i}", d) for i, d in enumerate(parts[3])]),
            *[(f"e{i}.txt", [(f"e{i}.txt:0", d)]) for i, d in enumerate(parts[4])],
            ("f.txt", [(f"f.txt:{i}", b) for i, b in enumerate(blocks)])]


def test_round_trip_all_formats(tmp_path, tokenizer, sp):
    """Windows decode to the documents of each split, in input order, and the split follows the documented
    key hash; token counts equal direct encoding + one EOS per document minus the reported dropped tail."""
    docs = make_docs(200, seed=1)
    inputs = _write_all_formats(tmp_path, docs)
    # txt files: one document each, except f.txt (blocks); run the two txt modes as separate inputs
    m1 = prep([tmp_path / "c" / "*.jsonl*", tmp_path / "c" / "*.parquet", tmp_path / "c" / "d_arrow",
               tmp_path / "c" / "e*.txt"], tokenizer, tmp_path / "out", SEQ, val_fraction=0.3, seed=7)
    m2 = prep([tmp_path / "c" / "f.txt"], tokenizer, tmp_path / "out_blocks", SEQ, val_fraction=0.3, seed=7,
              txt_blocks=True)
    for manifest, out, chosen in ((m1, "out", inputs[:-1]), (m2, "out_blocks", inputs[-1:])):
        keyed = [kd for _, kds in chosen for kd in kds]
        assert manifest["eos_id"] == EOS and manifest["seq_len"] == SEQ and manifest["dtype"] == "uint16"
        for split in ("train", "val"):
            split_docs = [d for k, d in keyed if in_val(k, 7, 0.3) == (split == "val")]
            expected = expected_stream(sp, split_docs)
            windows = read_windows(str(tmp_path / out / split))
            got = stream_of(windows)
            info = manifest["splits"][split]
            assert windows.shape[1] == SEQ + 1
            assert info["documents"] == len(split_docs) and info["tokens"] == len(expected)
            assert len(got) == len(expected) - info["dropped_tokens"]
            assert 0 <= info["dropped_tokens"] <= SEQ
            np.testing.assert_array_equal(got, expected[: len(got)])
            decoded = _decode_docs(sp, got)
            assert decoded == split_docs[: len(decoded)]
    assert m1["splits"]["val"]["documents"] > 0 and m2["splits"]["val"]["documents"] > 0


def test_every_window_overlaps_by_one_and_no_bos(tmp_path, tokenizer, sp):
    docs = make_docs(60, seed=2)
    write_jsonl(tmp_path / "a.jsonl", docs)
    m = prep([tmp_path / "a.jsonl"], tokenizer, tmp_path / "out", SEQ, val_fraction=0.0)
    w = read_windows(str(tmp_path / "out" / "train"))
    np.testing.assert_array_equal(w[1:, 0], w[:-1, -1])
    assert not (w == sp.bos_id()).any()
    assert m["splits"]["val"] == {"documents": 0, "tokens": 0, "windows": 0, "dropped_tokens": 0}
    full = expected_stream(sp, docs)
    assert len(w) == (len(full) - 1) // SEQ
    assert m["splits"]["train"]["dropped_tokens"] == len(full) - (len(w) * SEQ + 1)


def test_split_and_windows_independent_of_workers(tmp_path, tokenizer):
    docs = make_docs(400, seed=3)
    for i in range(3):
        write_jsonl(tmp_path / f"in{i}.jsonl", docs[i::3])
    m1 = prep([tmp_path / "in*.jsonl"], tokenizer, tmp_path / "w1", SEQ, val_fraction=0.2, workers=1)
    m2 = prep([tmp_path / "in*.jsonl"], tokenizer, tmp_path / "w2", SEQ, val_fraction=0.2, workers=2)
    assert m1["splits"] == m2["splits"]
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_windows(str(tmp_path / "w1" / split)),
                                      read_windows(str(tmp_path / "w2" / split)))


_KILL_AFTER_SECOND_COMMIT = """
import os, sys
from ratplus_mega.data_prep import to_mds
commit = to_mds._commit
def dying_commit(out, progress, inp, index, writers, part):
    commit(out, progress, inp, index, writers, part)
    if index == 1:
        # a half-written part of the next input, as a kill in the middle of writing leaves it
        os.makedirs(os.path.join(out, "train", ".000002.tmp"))
        open(os.path.join(out, "train", ".000002.tmp", "shard.00000.mds"), "wb").write(b"half")
        os._exit(9)
to_mds._commit = dying_commit
to_mds.prep_shards(to_mds.PrepOptions(inputs=sys.argv[3:], tokenizer=sys.argv[1], out=sys.argv[2], seq_len=%d,
                                      val_fraction=0.25, progress=False))
""" % SEQ


def test_resume_after_kill(tmp_path, tokenizer):
    """Killed right after the second input's commit: the re-run keeps the committed parts untouched, redoes
    the rest, and ends with exactly the windows of an uninterrupted run."""
    docs = make_docs(300, seed=4)
    paths = []
    for i in range(5):
        write_jsonl(tmp_path / f"in{i}.jsonl", docs[i * 60:(i + 1) * 60])
        paths.append(str(tmp_path / f"in{i}.jsonl"))
    clean = prep(paths, tokenizer, tmp_path / "clean", SEQ, val_fraction=0.25)
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_SECOND_COMMIT, tokenizer, str(out), *paths],
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    committed = {p: os.stat(p).st_mtime_ns for p in (out / "train" / "000000").iterdir()}
    resumed = prep(paths, tokenizer, out, SEQ, val_fraction=0.25)
    assert {p: os.stat(p).st_mtime_ns for p in (out / "train" / "000000").iterdir()} == committed
    assert not (out / "train" / ".000002.tmp").exists()
    assert resumed["splits"] == clean["splits"] and resumed["complete"]
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_windows(str(out / split)), read_windows(str(tmp_path / "clean" / split)))


def test_resume_discards_uncommitted_part(tmp_path, tokenizer):
    """A part renamed into place but whose marker was never written is redone, not counted twice."""
    docs = make_docs(120, seed=5)
    paths = []
    for i in range(3):
        write_jsonl(tmp_path / f"in{i}.jsonl", docs[i * 40:(i + 1) * 40])
        paths.append(str(tmp_path / f"in{i}.jsonl"))
    out = tmp_path / "out"
    first = prep(paths, tokenizer, out, SEQ, val_fraction=0.0)
    os.remove(out / ".progress" / "000002.json")
    again = prep(paths, tokenizer, out, SEQ, val_fraction=0.0)
    assert again["splits"] == first["splits"]
    assert len(read_windows(str(out / "train"))) == first["splits"]["train"]["windows"]


_BAD_CASES = {
    "malformed_json": ("x.jsonl", b'{"text": "good one"}\n{"text": bad}\n{"text": "good two"}\n', 2),
    "missing_field": ("x.jsonl", b'{"text": "good one"}\n{"body": "no text"}\n{"text": "good two"}\n', 2),
    "empty": ("x.jsonl", b'{"text": "good one"}\n{"text": " \\n "}\n{"text": "good two"}\n', 2),
    "undecodable": ("x.jsonl", b'{"text": "good one"}\n{"text": "caf\xff"}\n{"text": "good two"}\n', 2),
    "undecodable:txt": ("x.txt", b"good one\n\nsecond \xfe line\n\ngood two", 3),
    "undecodable:surrogate": ("x.jsonl", b'{"text": "good one"}\n{"text": "a\\ud800b"}\n{"text": "good two"}\n', 2),
}


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
@pytest.mark.parametrize("case", sorted(_BAD_CASES))
def test_bad_record(tmp_path, tokenizer, sp, case, strict):
    """Each kind of bad record is skipped, counted and reported as file:line, or stops the job with --strict."""
    name, payload, line = _BAD_CASES[case]
    reason = case.split(":")[0]
    (tmp_path / name).write_bytes(payload)
    where = f"{tmp_path / name}:{line}: {reason}"
    if strict:
        with pytest.raises(ValueError, match=re.escape(where)):
            prep([tmp_path / name], tokenizer, tmp_path / "out", 4, val_fraction=0.0, strict=True, txt_blocks=True)
        return
    m = prep([tmp_path / name], tokenizer, tmp_path / "out", 4, val_fraction=0.0, txt_blocks=True)
    assert m["skipped"]["counts"] == {reason: 1}
    assert [e.split(" (")[0] for e in m["skipped"]["examples"]] == [where]
    expected = expected_stream(sp, ["good one", "good two"])
    got = stream_of(read_windows(str(tmp_path / "out" / "train")))
    assert m["splits"]["train"]["documents"] == 2 and m["splits"]["train"]["tokens"] == len(expected)
    np.testing.assert_array_equal(got, expected[: len(got)])


def test_window_writer_writes_streamings_bytes(tmp_path):
    """The raw-bytes window encoding (pinned streaming internals) gives shards identical to MDSWriter's."""
    from streaming import MDSWriter

    from ratplus_mega.data_prep.windows import column_encoding, window_writer

    windows = np.random.default_rng(0).integers(0, 60000, size=(50, 9)).astype(np.uint16)
    with window_writer(str(tmp_path / "fast"), seq_len=8, dtype=np.dtype(np.uint16), size_limit=300) as w:
        for row in windows:
            w.write({"tokens": row})
    with MDSWriter(out=str(tmp_path / "plain"), columns={"tokens": column_encoding(8, np.dtype(np.uint16))},
                   compression="zstd", size_limit=300) as w:
        for row in windows:
            w.write({"tokens": row})
    names = sorted(os.listdir(tmp_path / "plain"))
    assert len(names) > 2 and sorted(os.listdir(tmp_path / "fast")) == names
    for name in names:
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    np.testing.assert_array_equal(read_windows(str(tmp_path / "fast")), windows)
    with pytest.raises(ValueError, match="expected uint16"):
        with window_writer(str(tmp_path / "bad"), seq_len=8, dtype=np.dtype(np.uint16), size_limit=300) as w:
            w.write({"tokens": windows[0].astype(np.uint32)})


def test_lines_only_the_standard_json_module_accepts_are_documents():
    """orjson rejects NaN and huge integers; such lines fall back to ``json`` and are not reported as bad."""
    from ratplus_mega.data_prep.readers import Record, parse_record

    for line in (b'{"text": "x", "p": NaN}\n', b'{"text": "x", "n": 123456789012345678901234567890}\n'):
        assert parse_record(Record(index=0, line=1, payload=line), kind="jsonl", text_field="text") == "x"


def test_bad_records_report_at_most_five_examples(tmp_path, tokenizer):
    (tmp_path / "x.jsonl").write_bytes(b"{nope\n" * 8 + b'{"text": "fine"}\n')
    m = prep([tmp_path / "x.jsonl"], tokenizer, tmp_path / "out", 4)
    assert m["skipped"]["counts"] == {"malformed_json": 8} and len(m["skipped"]["examples"]) == 5


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
@pytest.mark.parametrize("name,payload", [("x.jsonl.zst", b"not zstd at all"), ("x.parquet", b"PAR1garbage")],
                         ids=["zst", "parquet"])
def test_unreadable_file_stops_the_job(tmp_path, tokenizer, name, payload, strict):
    write_jsonl(tmp_path / "a.jsonl", ["fine"])
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(ValueError, match=f"input {tmp_path / name}: cannot read it"):
        prep([tmp_path / "a.jsonl", tmp_path / name], tokenizer, tmp_path / "out", 4, strict=strict)


def test_missing_column_names_file(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: no column 'text' \(columns: content\)"):
        prep([tmp_path / "x.parquet"], tokenizer, tmp_path / "out", 4)


def test_other_tokenizer_refused(tmp_path, tokenizer):
    from ratplus_mega.data_prep.train_tokenizer import TokenizerOptions, train_tokenizer

    write_jsonl(tmp_path / "a.jsonl", make_docs(300, seed=6))
    prep([tmp_path / "a.jsonl"], tokenizer, tmp_path / "out", SEQ)
    other = train_tokenizer(TokenizerOptions(inputs=[str(tmp_path / "a.jsonl")], vocab_size=300,
                                             out=str(tmp_path / "other.model")))
    manifest = tmp_path / "out" / "manifest.json"
    with pytest.raises(ValueError, match=f"{manifest}: these shards were written with tokenizer"):
        prep([tmp_path / "a.jsonl"], tokenizer=other, out=tmp_path / "out", seq_len=SEQ)


def test_tokenizer_is_lossless_with_llama_ids(tokenizer, sp):
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.GetPieceSize() == 400
    for text in ["  two leading", "trailing  ", "tabs\tand\nnewlines\r\n\n", "unseen: ß ∑ 𝔘 ☃ 中文 🎉", "a" * 50]:
        ids = sp.encode(text)
        assert sp.unk_id() not in ids and sp.decode(ids) == text, text


def test_cli_prep_shards(tmp_path, tokenizer, capsys):
    from ratplus_mega.cli import main

    write_jsonl(tmp_path / "a.jsonl", make_docs(50, seed=8))
    assert main(["prep", "shards", "--input", str(tmp_path / "*.jsonl"), "--tokenizer", tokenizer,
                 "--out", str(tmp_path / "out"), "--seq-len", "32", "--val-fraction", "0.1"]) == 0
    assert "train: " in capsys.readouterr().out
    assert main(["prep", "shards", "--input", str(tmp_path / "nothing*.jsonl"), "--tokenizer", tokenizer,
                 "--out", str(tmp_path / "out2"), "--seq-len", "32"]) == 2
    assert "matches no" in capsys.readouterr().err

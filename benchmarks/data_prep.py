"""Throughput of ``prep shards`` (1 and 2 workers) against sentencepiece alone, and of the training loader.

    python benchmarks/data_prep.py path/to/corpus.txt
    python benchmarks/data_prep.py --generate-mb 20

The text (repeated to ``--repeat`` copies) is cut into documents two ways: ``blocks``, its blank-line-separated
blocks (tinyshakespeare: ~50 tokens each, the worst case for per-document costs), and ``pages``, runs of
blocks of at least 4 kB (~1000 tokens, about FineWeb-Edu's mean document). Each is written as jsonl over four
files. The baseline is ``SentencePieceProcessor.encode`` of the same documents in one process with one
thread. Each job runs ``--trials`` times, interleaved, and the fastest run counts. Prep times include reading,
JSON parsing, worker start-up, MDS writing and merging, but not the one-time import of streaming (and
torch), done before timing.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import tempfile
import time


def _pages(blocks: list[str], min_chars: int = 4000) -> list[str]:
    pages, page = [], []
    for block in blocks:
        page.append(block)
        if sum(map(len, page)) >= min_chars:
            pages.append("\n\n".join(page))
            page = []
    return pages + (["\n\n".join(page)] if page else [])


def _blocks(args) -> list[str]:
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            blocks = [b for b in f.read().split("\n\n") if b.strip()]
    else:
        rng = random.Random(0)
        words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(1, 9))) for _ in range(5000)]
        blocks, size = [], 0
        while size < args.generate_mb * 1e6:
            blocks.append(" ".join(rng.choice(words) for _ in range(rng.randint(20, 400))))
            size += len(blocks[-1])
    return blocks * args.repeat


def _prep_rows(name: str, docs: list[str], tmp: str, sp, tok: str, args) -> tuple[list[tuple], dict]:
    """Raw sentencepiece and ``prep shards`` with 1 and 2 workers on ``docs``; returns table rows."""
    from ratplus_mega.data_prep.to_mds import PrepOptions, prep_shards

    folder = os.path.join(tmp, name)
    os.makedirs(folder)
    for k in range(4):
        with open(os.path.join(folder, f"part{k}.jsonl"), "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs[k::4])
    def raw_encode() -> int:
        return sum(len(ids) + 1 for ids in sp.encode(docs, num_threads=1))

    def prep(workers: int, trial: int) -> dict:
        return prep_shards(PrepOptions(inputs=[os.path.join(folder, "*.jsonl")], tokenizer=tok, seq_len=args.seq_len,
                                       out=os.path.join(folder, f"out{workers}-{trial}"), workers=workers,
                                       progress=False))

    # Best of several interleaved trials: on a shared machine a slow trial says nothing about the code.
    best = {"raw": float("inf"), 1: float("inf"), 2: float("inf")}
    for trial in range(args.trials):
        for job in best:
            start = time.perf_counter()
            result = raw_encode() if job == "raw" else prep(job, trial)
            best[job] = min(best[job], time.perf_counter() - start)
            if job == "raw":
                tokens = result
            else:
                m = result
    raw = tokens / best["raw"]
    label = f"{name} ({tokens / len(docs):.0f} tok/doc)"
    rows = [(f"sentencepiece encode, {label}", tokens, raw, raw, 1.0)]
    for workers in (1, 2):
        n = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
        rate = n / best[workers]
        rows.append((f"  prep shards, {workers} worker(s)", n, rate, rate / workers, rate / workers / raw))
    return rows, m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="?", help="a UTF-8 text file (default: generated text)")
    parser.add_argument("--generate-mb", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=16, help="copies of the documents (more work per start-up)")
    parser.add_argument("--trials", type=int, default=3, help="timed runs of each job; the best is reported")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import sentencepiece as spm

    from ratplus_mega.data_prep.train_tokenizer import TokenizerOptions, train_tokenizer

    import streaming  # noqa: F401 - imports torch (seconds): a one-time cost per job, kept out of the timings

    blocks = _blocks(args)
    tmp = tempfile.mkdtemp()
    # Removed at exit, after streaming's prefetch threads are stopped.
    atexit.register(shutil.rmtree, tmp, True)
    sample = os.path.join(tmp, "sample.txt")
    with open(sample, "w") as f:
        f.write("\n".join(blocks[: max(1, len(blocks) // args.repeat)]))
    tok = train_tokenizer(TokenizerOptions(inputs=[sample], vocab_size=args.vocab_size,
                                           out=os.path.join(tmp, "tok.model")))
    sp = spm.SentencePieceProcessor(model_file=tok)
    rows = []
    for name, docs in (("blocks", blocks), ("pages", _pages(blocks))):
        shape_rows, m = _prep_rows(name, docs, tmp, sp, tok, args)
        rows += shape_rows
    loader_rate = _loader_rate(os.path.join(tmp, "pages", "out1-0", "train"), args, m, sp.eos_id())
    print(f"\n{len(blocks)} blocks, vocab {args.vocab_size}, seq_len {args.seq_len}, {os.cpu_count()} CPUs")
    print(f"{'job':<44}{'tokens':>10}{'tokens/s':>12}{'per worker':>12}{'vs sp':>8}")
    for name, n, rate, per, ratio in rows:
        print(f"{name:<44}{n:>10}{rate:>12.3g}{per:>12.3g}{ratio:>8.2f}")
    print(f"{'train loader, 1 rank, B=' + str(args.batch_size):<44}{'':>10}{loader_rate:>12.3g}")


def _loader_rate(folder: str, args, manifest: dict, eos_id: int) -> float:
    from ratplus_mega.config.schema import DataConfig
    from ratplus_mega.data.loader import build_train_loader
    from ratplus_mega.data.streaming import DataLayout

    cfg = DataConfig(train=[folder], num_workers=0)
    loader = build_train_loader(cfg, seq_len=args.seq_len, vocab_size=manifest["vocab_size"], eos_id=eos_id,
                                layout=DataLayout(), micro_batch_size=args.batch_size)
    it = iter(loader)
    next(it)
    steps = min(200, manifest["splits"]["train"]["windows"] // (args.batch_size * args.trials) - 1)
    best = float("inf")
    for _ in range(args.trials):
        start = time.perf_counter()
        for _ in range(steps):
            inputs, _ = next(it)
        best = min(best, time.perf_counter() - start)
    return steps * inputs.numel() / best


if __name__ == "__main__":
    main()

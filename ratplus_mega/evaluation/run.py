"""``ratplus eval``: one model, several attention patterns, several tasks; a JSON file of result rows, a
printed table and PNG pictures beside the JSON.

Tasks: ``ppl`` (an MDS validation split or text files), ``recall`` (multi-query associative recall, the
quickstart's task), ``niah`` (needle in a haystack, single and multi-key, over a depth × length grid) and
``lm-eval:TASK[,TASK...]`` (lm-evaluation-harness, offline, local task files with ``--lm-eval-include``).
The synthetic tasks draw the same samples for every pattern (one seed), so patterns differ only by the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import RatplusError
from .models import LoadedModel, open_model, parse_patterns
from .synthetic import NeedleCell, RecallLayout, Vocabulary, answer_hits, niah_batch, recall_batch

SYNTHETIC = ("ppl", "recall", "niah")


@dataclass
class EvalOptions:
    model: str
    patterns: str = "dense,own"
    tasks: str = "ppl,recall,niah"
    out: str | None = None
    """Folder for results.json and the pictures (default: MODEL/eval for an HF folder, MODEL/eval for a run)."""
    val: str | None = None
    """MDS split for ``ppl`` (default: the run's data.val when MODEL is a training run)."""
    text: list[str] = field(default_factory=list)
    """Text files for ``ppl`` instead of an MDS split."""
    eval_tokens: int | None = None
    tokenizer: str | None = None
    batch_size: int = 16
    seed: int = 0
    recall_samples: int = 512
    recall_facts: int = 8
    recall_slot: int = 8
    recall_length: int | None = None
    """Tokens per recall sample (default: the model's window, at most 128, minus one)."""
    recall_rounds: int = RecallLayout.rounds
    """Rounds of queries per recall sample (only the first is scored)."""
    recall_repeat: int = RecallLayout.repeat
    """Times each word of a fact is written in a recall sample."""
    niah_lengths: list[int] = field(default_factory=list)
    """Context lengths (default: 1/4, 1/2, 3/4 and all of the model's window)."""
    niah_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    niah_samples: int = 32
    niah_keys: int = 4
    """Needles in the multi-key variant (one of them is asked for)."""
    lm_eval_include: str | None = None
    lm_eval_limit: int | None = None
    num_fewshot: int | None = None


def parse_tasks(text: str) -> tuple[list[str], list[str]]:
    """(synthetic tasks, lm-eval tasks) of ``ppl,recall,lm-eval:piqa,hellaswag``: every item after an
    ``lm-eval:`` item that is not ppl, recall or niah is an lm-eval task too."""
    ours, harness, in_harness = [], [], False
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item.startswith("lm-eval:"):
            in_harness = True
            item = item[len("lm-eval:"):]
            if item:
                harness.append(item)
        elif item in SYNTHETIC:
            ours.append(item)
        elif in_harness:
            harness.append(item)
        else:
            raise RatplusError(f"--tasks: unknown task {item!r} (ppl, recall, niah, lm-eval:TASK[,TASK...])")
    if not ours and not harness:
        raise RatplusError("--tasks: no task given")
    return list(dict.fromkeys(ours)), list(dict.fromkeys(harness))


def run_eval(opts: EvalOptions, *, echo=print) -> dict:
    """Evaluate, write ``results.json`` and the pictures, print the table; returns the results."""
    ours, harness = parse_tasks(opts.tasks)
    patterns = parse_patterns(opts.patterns)
    with open_model(opts.model, tokenizer=opts.tokenizer) as loaded:
        out = Path(opts.out) if opts.out else Path(opts.model) / "eval"
        windows = _ppl_windows(opts, loaded) if "ppl" in ours else None
        rows, names = [], []
        for pattern in patterns:
            name = loaded.set_pattern(pattern)
            if name in names:
                continue
            names.append(name)
            if windows is not None:
                from .perplexity import cross_entropy

                rows.append({"task": "ppl", "pattern": name, **cross_entropy(loaded.logits, windows)})
            if "recall" in ours:
                rows.append({"task": "recall", "pattern": name, **recall_accuracy(loaded, opts)})
            if "niah" in ours:
                rows += [{"task": "niah", "pattern": name, **r} for r in niah_grid(loaded, opts)]
            if harness:
                rows += [{"pattern": name, **r} for r in _lm_eval_rows(loaded, harness, opts)]
    results = {"model": str(opts.model), "patterns": names, "options": asdict(opts), "results": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    pictures = _pictures(rows, out)
    echo(format_table(rows, names))
    echo(f"results: {out / 'results.json'}" + "".join(f"\npicture: {p}" for p in pictures))
    return results


def recall_accuracy(loaded: LoadedModel, opts: EvalOptions) -> dict:
    """``{"recall", "answers"}``: MQAR accuracy under the pattern set on ``loaded``."""
    layout = RecallLayout(length=opts.recall_length or min(loaded.max_length, 128) - 1, facts=opts.recall_facts,
                          slot=opts.recall_slot, rounds=opts.recall_rounds,
                          repeat=opts.recall_repeat)
    tokens, answers = recall_batch(_vocabulary(loaded), layout, opts.recall_samples,
                                   torch.Generator().manual_seed(opts.seed))
    hits, total = answer_hits(loaded.logits, tokens, answers, opts.batch_size)
    return {"recall": hits / total, "answers": total}


def niah_grid(loaded: LoadedModel, opts: EvalOptions) -> list[dict]:
    """One row per (variant, length, depth): the share of samples whose asked-for value is predicted."""
    vocab = _vocabulary(loaded)
    top = loaded.max_length
    lengths = opts.niah_lengths or sorted({max(8, top * i // 4) for i in (1, 2, 3, 4)})
    if max(lengths) > top:
        raise RatplusError(f"--niah-lengths: {max(lengths)} is beyond the model's window ({top})")
    rows = []
    for variant, needles in (("single", 1), ("multikey", opts.niah_keys)):
        for length in lengths:
            for depth in opts.niah_depths:
                generator = torch.Generator().manual_seed(opts.seed + 7919 * length + int(1000 * depth) + needles)
                tokens, answers = niah_batch(vocab, NeedleCell(length, depth, needles), opts.niah_samples, generator)
                hits, total = answer_hits(loaded.logits, tokens, answers, opts.batch_size)
                rows.append({"variant": variant, "needles": needles, "length": length, "depth": depth,
                             "recall": hits / total, "samples": total})
    return rows


def _vocabulary(loaded: LoadedModel) -> Vocabulary:
    try:
        return Vocabulary.from_tokenizer(loaded.encode)
    except ValueError as e:
        raise RatplusError(f"--model {loaded.folder}: {e}") from None


def _ppl_windows(opts: EvalOptions, loaded: LoadedModel):
    from .perplexity import mds_windows, text_windows

    config = loaded.model.config
    if opts.text:
        return text_windows(opts.text, loaded.encode, seq_len=loaded.max_length, eos_id=config.eos_token_id,
                            batch_size=opts.batch_size, max_tokens=opts.eval_tokens)
    val = opts.val
    if val is None and not (Path(opts.model) / "config.json").is_file():
        from ..checkpoint import resolve_checkpoint, run_config

        val = run_config(resolve_checkpoint(opts.model, key="--model")).data.val
    if val is None:
        raise RatplusError("ppl needs --val DATA/val (an MDS split) or --text FILES")
    return mds_windows(val, seq_len=loaded.max_length, vocab_size=config.vocab_size, eos_id=config.eos_token_id,
                       batch_size=opts.batch_size, max_tokens=opts.eval_tokens)


def _lm_eval_rows(loaded: LoadedModel, tasks: list[str], opts: EvalOptions) -> list[dict]:
    try:
        from .harness import run_lm_eval
    except ImportError as e:
        raise RatplusError(f"lm-eval tasks need lm-evaluation-harness (pip install lm-eval): {e}") from None
    try:
        result = run_lm_eval(loaded, tasks, include_path=opts.lm_eval_include, limit=opts.lm_eval_limit,
                             num_fewshot=opts.num_fewshot, batch_size=opts.batch_size)
    except (KeyError, FileNotFoundError, ConnectionError, OSError) as e:
        raise RatplusError(f"lm-eval: {type(e).__name__}: {e} (offline: the tasks' data must be local; point "
                           "--lm-eval-include at task files that read local data)") from None
    rows = []
    for task, metrics in sorted(result["results"].items()):
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if isinstance(value, (int, float)) and not metric.endswith("_stderr") and metric != "sample_len":
                rows.append({"task": f"lm-eval:{task}", "metric": metric, "value": float(value)})
    return rows


def format_table(rows: list[dict], patterns: list[str]) -> str:
    """One line per measurement, one column per pattern."""
    lines: dict[str, dict[str, str]] = {}
    niah: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["task"] == "ppl":
            lines.setdefault("val loss", {})[r["pattern"]] = f"{r['loss']:.4f}"
            lines.setdefault("perplexity", {})[r["pattern"]] = f"{r['ppl']:.3f}"
        elif r["task"] == "recall":
            lines.setdefault("recall", {})[r["pattern"]] = f"{r['recall']:.1%}"
        elif r["task"] == "niah":
            niah.setdefault((r["variant"], r["pattern"]), []).append(r["recall"])
        else:
            lines.setdefault(f"{r['task']} {r['metric']}", {})[r["pattern"]] = f"{r['value']:.4f}"
    for (variant, pattern), values in niah.items():
        lines.setdefault(f"niah {variant} (grid mean)", {})[pattern] = f"{sum(values) / len(values):.1%}"
    width = max([len(k) for k in lines] + [10]) + 2
    cols = [max(len(p), 9) + 2 for p in patterns]
    head = f"{'':<{width}}" + "".join(f"{p:>{c}}" for p, c in zip(patterns, cols))
    body = [f"{k:<{width}}" + "".join(f"{v.get(p, '-'):>{c}}" for p, c in zip(patterns, cols))
            for k, v in lines.items()]
    return "\n".join([head, *body])


def _pictures(rows: list[dict], out: Path) -> list[Path]:
    from .plots import niah_heatmaps, recall_bars

    pictures = []
    recall = {r["pattern"]: r["recall"] for r in rows if r["task"] == "recall"}
    if recall:
        pictures.append(recall_bars({"recall": recall}, out / "recall_by_pattern.png",
                                    title="associative recall by pattern"))
    niah = [r for r in rows if r["task"] == "niah"]
    if niah:
        pictures.append(niah_heatmaps(niah, out / "niah_heatmap.png"))
    return pictures

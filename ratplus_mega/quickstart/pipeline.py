"""``ratplus quickstart``: the whole pipeline on a small scale, end to end, on this machine.

corpus (synthetic, or the user's files) → sentencepiece tokenizer → MDS shards → joint pretraining on two
ranks (ZeRO-2; the GPUs when present) → adaptation to a dilated pattern → validation table, recall accuracy
and a loss plot → HF export → a sample generated with the compressed sparse cache.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

@dataclass
class QuickstartOptions:
    out: Path = Path("runs/quickstart")
    inputs: list[str] = field(default_factory=list)
    """The user's own text/jsonl/parquet files instead of the synthetic corpus."""
    preset: str = "tiny"
    seq_len: int = 256
    documents: int = 4000
    pretrain_steps: int = 300
    adapt_steps: int = 100
    pattern: tuple[int, int, int] = (8, 16, 4)
    """The inference pattern adapted to (D, W, P), scaled to the short window."""
    recall_questions: int = 40


def run_quickstart(opts: QuickstartOptions) -> None:
    from ..data_prep.to_mds import PrepOptions, prep_shards
    from ..data_prep.train_tokenizer import TokenizerOptions, train_tokenizer
    from .corpus import write_corpus

    out = opts.out.resolve()
    inputs = ([str(Path(i).resolve()) for i in opts.inputs]
              or [str(write_corpus(out / "corpus" / "train.jsonl", opts.documents))])
    _say(f"corpus: {', '.join(inputs)}")
    tokenizer = train_tokenizer(TokenizerOptions(inputs=inputs, vocab_size=512, out=str(out / "tokenizer.model"),
                                                 model_type="bpe", text_field="text", txt_blocks=False))
    shards = out / "shards"
    prep_shards(PrepOptions(inputs=inputs, tokenizer=str(tokenizer), out=str(shards), seq_len=opts.seq_len,
                            text_field="text", val_fraction=0.05, seed=0, workers=1, strict=False,
                            txt_blocks=False))
    _say(f"tokenizer {tokenizer} (512 pieces) and shards of {opts.seq_len + 1}-token windows in {shards}")
    common = [f"model.preset={opts.preset}", f"model.seq_len={opts.seq_len}", f"data.train=[{shards}/train]",
              f"data.val={shards}/val", f"data.tokenizer={tokenizer}", "train.eval_tokens=32768",
              "train.log_interval=5"]
    tokens_per_step = 8 * opts.seq_len
    pretrain = _train(out / "pretrain", common + [
        "train.joint=true", f"train.train_tokens={opts.pretrain_steps * tokens_per_step}",
        f"train.eval_interval={opts.pretrain_steps}", f"train.save_interval={opts.pretrain_steps}"],
        "joint pretraining (a step under the preset's sparse pattern, then a dense step, per batch)")
    d, w, p = opts.pattern
    adapt = _train(out / "adapt", common + [
        "train.phase=adapt", "train.joint=false", f"train.init_from={out / 'pretrain' / 'checkpoints'}",
        f"model.pattern.dilation={d}", f"model.pattern.window={w}", f"model.pattern.sinks={p}",
        "data.sampler=random_offset", "train.lr=1e-3", "train.warmup_fraction=0",
        f"train.train_tokens={opts.adapt_steps * tokens_per_step}", f"train.eval_interval={opts.adapt_steps}",
        f"train.save_interval={opts.adapt_steps}"], f"adaptation to D={d} W={w} P={p}")
    plot = _plot(pretrain, adapt, out / "loss_curves.png")
    _say(f"loss curves: {plot}")

    from ..export.to_hf import export_hf
    from ..inference.generate import generate_text

    pre_hf = export_hf(out / "pretrain", out / "hf-pretrained", dtype=torch.float32, overwrite=True)
    hf = export_hf(out / "adapt", out / "hf", dtype=torch.float32, overwrite=True)
    _report(pretrain, adapt, pre_hf, hf, opts)
    from .corpus import recall_questions

    question = recall_questions(1, seed=99)[0]
    prompt = question.prompt[-200:]
    sample = generate_text(hf, prompt, max_new_tokens=24)
    _say(f"HF export (adapted model, pattern D={d} W={w} P={p}): {hf}")
    _say(f"sample with the compressed sparse cache ({sample.tokens_per_second:.0f} tokens/s, cache "
         f"{sample.cache_bytes} bytes):\n  ...{prompt}\u2192{sample.text}")


def _train(out: Path, overrides: list[str], what: str) -> dict:
    nproc = max(torch.cuda.device_count(), 2)
    _say(f"{what}: {nproc} ranks, ZeRO-2, logs and checkpoints in {out}")
    # A rerun starts afresh; the previous run's checkpoints move to checkpoints.replaced-<time>/.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "ratplus_mega.cli", "train", "--config", "configs/train/tiny-cpu.yaml",
           f"train.out_dir={out}", "train.resume=never", "train.overwrite=true", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_repo())
    (out / "train.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); the log is {out / 'train.log'}")
    return _read_run(out)


def _read_run(out: Path) -> dict:
    """The training curve (step, loss under the run's pattern, dense loss or None) and the last validation's
    loss per pattern name, from the run's metrics.jsonl."""
    from ..train.metrics import read_metrics

    steps = []
    for r in read_metrics(out, "train"):
        sparse = next(v for k, v in r.items() if k.startswith("train/loss_") and k != "train/loss_dense")
        steps.append((r["step"], sparse, r.get("train/loss_dense")))
    last_val = (read_metrics(out, "val") or [{}])[-1]
    val = {k[len("val/loss_"):]: v for k, v in last_val.items() if k.startswith("val/loss_")}
    return {"steps": steps, "val": val}


def _plot(pretrain: dict, adapt: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [s for s, _, _ in pretrain["steps"]]
    sparse = next((k for k in pretrain["val"] if k != "dense"), "sparse")
    ax.plot(steps, [x for _, x, _ in pretrain["steps"]], label=f"pretrain, sparse pass ({sparse})")
    ax.plot(steps, [x for _, _, x in pretrain["steps"]], label="pretrain, dense pass")
    last = steps[-1] if steps else 0
    target = next((k for k in adapt["val"] if k != "dense"), "sparse")
    ax.plot([last + s for s, _, _ in adapt["steps"]], [x for _, x, _ in adapt["steps"]],
            label=f"adaptation ({target})")
    ax.set_xlabel("global batch")
    ax.set_ylabel("training loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _report(pretrain: dict, adapt: dict, pre_hf: Path, hf: Path, opts: QuickstartOptions) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .corpus import recall_questions

    questions = recall_questions(opts.recall_questions, seed=99)
    rows = []
    for name, run, folder in (("pretrained (joint)", pretrain, pre_hf), ("adapted", adapt, hf)):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        sparse_name = next((k for k in run["val"] if k != "dense"), "dense")
        rows.append((name, run["val"].get("dense"), sparse_name, run["val"].get(sparse_name),
                     _recall(model, tokenizer, questions, "dense"), _recall(model, tokenizer, questions, "sparse")))
    print("\n" + f"{'model':<20}{'val loss dense':>16}{'sparse pattern':>16}{'val loss sparse':>17}"
          f"{'recall dense':>14}{'recall sparse':>15}")
    for name, dense, pattern, sparse, r_dense, r_sparse in rows:
        print(f"{name:<20}{dense:>16.4f}{pattern:>16}{sparse:>17.4f}{r_dense:>14.0%}{r_sparse:>15.0%}")
    print("val loss: token-mean cross-entropy on the held-out split; recall: share of questions about a fact "
          "stated earlier in the document answered exactly by greedy decoding (reported, not a gate).\n")


def _recall(model, tokenizer, questions, mode: str) -> float:
    hits = 0
    for q in questions:
        ids = tokenizer(q.prompt, add_special_tokens=False, return_tensors="pt").input_ids
        ids = ids[:, -(model.config.max_position_embeddings - 8):]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             attention_mode=mode, pad_token_id=model.config.eos_token_id)
        # sentencepiece drops the leading space of the first decoded piece: compare the number itself
        said = re.match(r"\s*(\d+)", tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        hits += bool(said) and said.group(1) == q.answer.strip()
    return hits / len(questions)


def _repo() -> Path:
    return Path(__file__).resolve().parents[2]


def _say(text: str) -> None:
    print(f"==> {text}", flush=True)

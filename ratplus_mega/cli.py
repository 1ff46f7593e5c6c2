"""``ratplus`` command line: one subcommand per job, each a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from . import __version__
from .errors import RatplusError


def _parse_pattern(text: str) -> tuple:
    """``D,W,P`` or, for top-k block attention (docs/spec.md §4.5), ``D,W,P,K,S``: the head pattern (D, W, P)
    or (D, W, P, K, S, "max"); ``pattern_fields(pattern)`` gives its config fields."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (3, 5):
        raise argparse.ArgumentTypeError(f"expected D,W,P or D,W,P,K,S (integers), got {text!r}")
    from .config.schema import PATTERN_KEYS, PatternConfig

    try:
        return PatternConfig(**dict(zip(PATTERN_KEYS, values))).per_layer(1)[0]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_info(args: argparse.Namespace) -> int:
    from .accounting import DENSE, cache_bytes, flops_per_token, parameter_count
    from .config.load import load_config
    from .config.schema import pattern_name

    cfg = load_config(args.config, args.overrides)
    m = cfg.model
    configured = m.layer_patterns()
    rows = [("dense", [DENSE] * m.num_layers)]
    if not m.pattern.is_dense:
        rows.append((pattern_name(configured), configured))
    rows += [(pattern_name([p]), [p] * m.num_layers) for p in args.pattern]
    print(f"model: {m.num_layers} layers x {m.hidden_size} ({m.num_heads} heads of {m.head_dim}), "
          f"FFN {m.ffn_hidden_size}, vocab {m.vocab_size}, seq {m.seq_len}, "
          f"{'RAT+' if m.apply_recurrence else 'gated attention (no recurrence)'}")
    print(f"parameters: {parameter_count(m)}")
    dense_flops, dense_cache = flops_per_token(m), cache_bytes(m, patterns=rows[0][1])
    print(f"\n{'pattern':<22}{'fwd FLOPs/token':>18}{'vs dense':>10}{'cache bytes/seq':>18}{'vs dense':>10}")
    for name, patterns in rows:
        flops, cache = flops_per_token(m, patterns), cache_bytes(m, patterns=patterns)
        print(f"{name:<22}{flops:>18}{flops / dense_flops:>10.3f}{cache:>18}{cache / dense_cache:>10.3f}")
    print(f"\nFLOPs at seq {m.seq_len}, forward only (training is 3x); decode cache for one {m.seq_len}-token "
          "sequence: bf16 keys/values plus the fp32 recurrence state (docs/flops.md).")
    _print_dense_in_effect(m, rows[1:])
    if args.check:
        _print_check(m)
    return 0


def _print_dense_in_effect(m, rows) -> None:
    """Name the sparse rows that see every earlier key at the model's seq_len, and so cost what dense costs."""
    from .accounting import dense_in_effect

    for name, patterns in rows:
        layers = [i for i, p in enumerate(patterns) if p[0] != 1 and dense_in_effect(p, m.seq_len)]
        if not layers:
            continue
        everywhere = all(p[0] == 1 or dense_in_effect(p, m.seq_len) for p in patterns)
        where = "" if everywhere else f" in layer{'s' * (len(layers) > 1)} {', '.join(map(str, layers))}"
        print(f"{name} is dense in effect{where} at seq {m.seq_len}: every query sees every earlier key, so it "
              "costs what dense costs")


def _print_check(m) -> None:
    from .selfcheck import check_model

    r = check_model(m)
    print(f"\ncheck (random fp32 weights, seq {r.seq_len}): forward dense {r.forward_seconds['dense']:.3f} s, "
          f"sparse {r.forward_seconds['sparse']:.3f} s; decode {r.decode_tokens_per_second:.1f} tokens/s with a "
          f"{r.cache_bytes}-byte compressed cache; decoded vs full-forward logits: max relative error "
          f"{r.decode_max_error:.1e}")
    if not r.decode_max_error < 1e-4:
        raise RuntimeError("the decode cache does not reproduce the full forward pass")


def cmd_import_public(args: argparse.Namespace) -> int:
    import torch

    from .export.hf_folder import write_hf_folder
    from .export.import_public import public_to_hf, read_pattern_file

    if args.pattern_file:
        pattern = read_pattern_file(args.pattern_file)
    else:
        from .config.schema import pattern_fields

        pattern = pattern_fields(args.pattern or (1, 0, 0))
    config, state = public_to_hf(args.checkpoint, **pattern, head_dim=args.head_dim)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    out = write_hf_folder(args.out, config, state, args.tokenizer, dtype=dtype, overwrite=args.overwrite)
    kind = "RAT+" if config.apply_recurrence else "gated attention (no recurrence)"
    print(f"wrote {out}: {kind}, {config.num_hidden_layers} layers x {config.hidden_size}, vocab "
          f"{config.vocab_size}, pattern dilation={config.dilation} window={config.window} sinks={config.sinks}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config.load import load_config
    from .train.loop import run_training

    return run_training(load_config(args.config, args.overrides))


def cmd_prep_tokenizer(args: argparse.Namespace) -> int:
    from .data_prep.train_tokenizer import TokenizerOptions, train_tokenizer

    opts = TokenizerOptions(inputs=args.input, vocab_size=args.vocab_size, out=args.out,
                            model_type=args.model_type, text_field=args.text_field, txt_blocks=args.txt_blocks)
    try:
        path = train_tokenizer(opts)
    except OSError as e:
        raise _output_error(e, args.out) from e
    print(f"wrote {path} ({args.model_type}, {args.vocab_size} pieces; unk 0, bos 1, eos 2, byte fallback)")
    return 0


def cmd_prep_shards(args: argparse.Namespace) -> int:
    from .data_prep.to_mds import PrepOptions, prep_shards

    try:
        m = prep_shards(PrepOptions(inputs=args.input, tokenizer=args.tokenizer, out=args.out, seq_len=args.seq_len,
                                    text_field=args.text_field, val_fraction=args.val_fraction, seed=args.seed,
                                    workers=args.workers, strict=args.strict, txt_blocks=args.txt_blocks))
    except OSError as e:
        raise _output_error(e, args.out) from e
    for split, s in m["splits"].items():
        print(f"{split}: {s['documents']} documents, {s['tokens']} tokens, {s['windows']} windows of "
              f"{m['seq_len'] + 1}, {s['dropped_tokens']} tail tokens dropped")
    skipped = m["skipped"]["counts"]
    if skipped:
        print("skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())))
        print("\n".join(f"  e.g. {e}" for e in m["skipped"]["examples"]))
    print(f"wrote {args.out}/{{train,val}} and {args.out}/manifest.json")
    return 0


def _output_error(e: OSError, out: str) -> RatplusError:
    """One line for an OSError met by a job that writes ``out``: naming ``--out`` when the failing path is
    there (unwritable, read-only, a file in the way), else the path itself."""
    name = str(e.filename or out)
    reason = e.strerror or type(e).__name__
    path, target = os.path.abspath(name), os.path.abspath(out)
    if os.path.commonpath([path, target]) in (path, target):  # --out itself, inside it, or a folder above it
        return RatplusError(f"--out {out}: cannot write there ({reason}: {name}); choose a folder you can write to")
    return RatplusError(f"{name}: {reason}")


def cmd_export_hf(args: argparse.Namespace) -> int:
    import torch

    from .export.to_hf import export_hf

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    out = export_hf(args.checkpoint, args.out, pattern=args.pattern, dtype=dtype, tokenizer=args.tokenizer,
                    overwrite=args.overwrite)
    print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .inference.generate import generate_text

    g = generate_text(args.model, args.prompt, max_new_tokens=args.max_new_tokens, pattern=args.pattern,
                      dense=args.dense, tokenizer=args.tokenizer)
    print(args.prompt + g.text)
    print(f"\n[{g.pattern}] {g.prompt_tokens} prompt + {g.new_tokens} new tokens, {g.tokens_per_second:.1f} "
          f"tokens/s, decode cache {g.cache_bytes} bytes")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .checkpoint import verify_checkpoints

    root, reports = verify_checkpoints(args.run)
    print(f"{root}: {len(reports)} committed checkpoint{'s' * (len(reports) != 1)}, oldest first")
    width = max(len(r.path.name) for r in reports) + 2
    print(f"{'checkpoint':<{width}}{'step':>10}  {'layout':<22}{'run':<25}verifies")
    for r in reports:
        layout = " ".join(f"{k}{v}" for k, v in r.layout.items()) if r.layout else "?"
        if r.problems:
            first = r.problems[0]
            what = "REFUSED" if first.refused else "no"
            more = f" (and {len(r.problems) - 1} more)" if len(r.problems) > 1 else ""
            verdict = f"{what}: {first.path.name} {first.detail}{more}"
        else:
            verdict = f"yes ({r.files} files" + (", sizes and SHA-256 checked)" if r.recorded else
                                                 "; no checksums recorded: pickles scanned only)")
        print(f"{r.path.name:<{width}}{r.step:>10}  {layout:<22}{r.run_id or '-':<25}{verdict}")
    aside = sorted(p.name for p in root.glob("step*.*-*") if p.is_dir())
    if aside:
        print(f"set aside (never resumed from or pruned): {', '.join(aside)}")
    return 0 if all(not r.problems for r in reports) else 1


def cmd_quickstart(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .quickstart.pipeline import QuickstartOptions, run_quickstart

    given = {key: getattr(args, key) for key in ("documents", "pretrain_steps", "adapt_steps", "batch_size")
             if getattr(args, key) is not None}
    run_quickstart(QuickstartOptions(out=Path(args.out), inputs=args.input, preset=args.preset, **given))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.run import EvalOptions, run_eval

    run_eval(EvalOptions(model=args.model, patterns=args.patterns, tasks=args.tasks, out=args.out, val=args.val,
                         text=args.text, eval_tokens=args.eval_tokens, tokenizer=args.tokenizer,
                         batch_size=args.batch_size, seed=args.seed, recall_samples=args.recall_samples,
                         niah_lengths=args.niah_lengths, niah_samples=args.niah_samples,
                         lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit,
                         num_fewshot=args.num_fewshot))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratplus", description="RAT+ pretraining stack")
    parser.add_argument("--version", action="version", version=f"ratplus-mega {__version__}")
    # The deepspeed launcher passes --local_rank=N before the subcommand; the rank is read from LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error too (anywhere on the line; or RATPLUS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameters, FLOPs per token and decode-cache size of a config")
    info.add_argument("--config", required=True, help="a model preset or run config (YAML)")
    info.add_argument("--pattern", type=_parse_pattern, action="append", default=[], metavar="D,W,P[,K,S]",
                      help="also report this sparse pattern (repeatable)")
    info.add_argument("--check", action="store_true",
                      help="also build the model with random weights, run it and check cached decoding")
    info.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    info.set_defaults(func=cmd_info)

    prep = sub.add_parser("prep", help="data preparation: train a tokenizer, tokenize corpora into MDS shards")
    prep_sub = prep.add_subparsers(dest="prep_command", required=True)
    tok = prep_sub.add_parser("tokenizer", help="train a lossless sentencepiece model (unk 0, bos 1, eos 2)")
    tok.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".txt, .jsonl(.zst), .parquet files")
    tok.add_argument("--vocab-size", type=int, required=True, metavar="N")
    tok.add_argument("--out", required=True, metavar="PATH.model")
    tok.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    tok.add_argument("--text-field", default="text", help="JSON key or column holding the text (default: text)")
    tok.add_argument("--txt-blocks", action="store_true", help="a .txt document per blank-line-separated block")
    tok.set_defaults(func=cmd_prep_tokenizer)
    shards = prep_sub.add_parser("shards", help="tokenize corpora into (seq_len+1)-token MDS windows, train/val")
    shards.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                        help=".txt, .jsonl, .jsonl.zst, .parquet, datasets.save_to_disk folders, globs, folders")
    shards.add_argument("--tokenizer", required=True, metavar="PATH.model", help="sentencepiece model")
    shards.add_argument("--out", required=True, metavar="DIR", help="writes DIR/train, DIR/val, DIR/manifest.json")
    shards.add_argument("--seq-len", type=int, required=True, metavar="N", help="training window (model.seq_len)")
    shards.add_argument("--text-field", default="text", help="JSON key or column holding the text (default: text)")
    shards.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                        help="fraction of documents held out (default 0.005, as the reference)")
    shards.add_argument("--seed", type=int, default=1005, help="seed of the document-level split hash")
    shards.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizing processes")
    shards.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    shards.add_argument("--txt-blocks", action="store_true", help="a .txt document per blank-line-separated block")
    shards.set_defaults(func=cmd_prep_shards)

    imp = sub.add_parser("import-public", help="convert a public RAT+ checkpoint (.pth) into a HuggingFace folder")
    imp.add_argument("--checkpoint", required=True, help="torch.save file of the public RAT+ code")
    imp.add_argument("--out", required=True, help="HuggingFace folder to write (must not exist)")
    which = imp.add_mutually_exclusive_group()
    which.add_argument("--pattern", type=_parse_pattern, metavar="D,W,P[,K,S]",
                       help="sparse pattern (default: dense); write D=-1 as --pattern=-1,W,P")
    which.add_argument("--pattern-file", metavar="PATTERN.yaml",
                       help="per-layer pattern: {dilation: [...], window: ..., sinks: ...}")
    imp.add_argument("--head-dim", type=int, metavar="N",
                     help="head dimension, for a checkpoint whose config does not give it (must agree if it does)")
    imp.add_argument("--tokenizer", help="sentencepiece .model to write as the folder's tokenizer")
    imp.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weights on disk (default bf16)")
    imp.add_argument("--overwrite", action="store_true", help="replace --out once the new folder is complete")
    imp.set_defaults(func=cmd_import_public)

    train = sub.add_parser("train", help="pretrain or adapt a model (one process, torchrun or deepspeed launcher)")
    train.add_argument("--config", required=True, help="a run config, e.g. configs/train/tiny-cpu.yaml")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    train.set_defaults(func=cmd_train)

    exp = sub.add_parser("export-hf", help="a training checkpoint (any layout, ZeRO 0-3) to a HuggingFace folder")
    exp.add_argument("--checkpoint", required=True, help="a committed checkpoint, or a run's checkpoints folder")
    exp.add_argument("--out", required=True, help="HuggingFace folder to write")
    exp.add_argument("--pattern", type=_parse_pattern, metavar="D,W,P[,K,S]",
                     help="sparse pattern for every layer (default: the run's; write --pattern=-1,W,P for D=-1)")
    exp.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weights on disk (default bf16)")
    exp.add_argument("--tokenizer", help="sentencepiece .model (default: the run's data.tokenizer)")
    exp.add_argument("--overwrite", action="store_true", help="replace --out once the new folder is complete")
    exp.set_defaults(func=cmd_export_hf)

    ver = sub.add_parser("verify", help="list a run's checkpoints: step, layout, and whether each verifies "
                                        "(exit status 1 if one does not)")
    ver.add_argument("run", metavar="RUN_DIR", help="a run folder, its checkpoints folder, or one checkpoint")
    ver.set_defaults(func=cmd_verify)

    quick = sub.add_parser("quickstart", help="the whole pipeline on a synthetic corpus, end to end")
    quick.add_argument("--out", default="runs/quickstart", help="where every artefact goes")
    quick.add_argument("--input", nargs="*", default=[], help="your own .txt/.jsonl/.parquet files instead")
    quick.add_argument("--preset", default="tiny", help="model preset of configs/model/ (default tiny)")
    quick.add_argument("--documents", type=int, help="synthetic documents to write (default 40000)")
    quick.add_argument("--pretrain-steps", type=int, help="pretraining steps of each model (default 1000)")
    quick.add_argument("--adapt-steps", type=int, help="adaptation steps of each model (default 100)")
    quick.add_argument("--batch-size", type=int, help="sequences per step (default 64)")
    quick.set_defaults(func=cmd_quickstart)

    ev = sub.add_parser("eval", help="perplexity, recall, needle-in-a-haystack and lm-eval tasks per attention pattern")
    ev.add_argument("--model", required=True, help="an HF folder or a training run (exported on the fly)")
    ev.add_argument("--patterns", default="dense,own", metavar="P,P,...",
                    help="dense, own (the folder's), D:W:P, D:W:P:K:S, or such patterns joined by / (one per equal "
                         "group of heads), comma-separated (default dense,own)")
    ev.add_argument("--tasks", default="ppl,recall,niah", metavar="T,T,...",
                    help="ppl, recall, niah, lm-eval:TASK[,TASK...] (default ppl,recall,niah)")
    ev.add_argument("--out", help="folder for results.json and the PNG pictures (default MODEL/eval)")
    ev.add_argument("--val", metavar="DATA/val", help="MDS split for ppl (default: a run's data.val)")
    ev.add_argument("--text", nargs="+", default=[], metavar="FILE", help="text/jsonl/parquet files for ppl instead")
    ev.add_argument("--eval-tokens", type=int, metavar="N", help="ppl on the first N // seq_len windows (default all)")
    ev.add_argument("--tokenizer", metavar="PATH.model", help="sentencepiece model, where the folder or run has none")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--seed", type=int, default=0, help="seed of the synthetic recall and niah samples")
    ev.add_argument("--recall-samples", type=int, default=512, metavar="N")
    ev.add_argument("--niah-lengths", type=int, nargs="+", default=[], metavar="N",
                    help="context lengths (default 1/4, 1/2, 3/4 and all of the model's window)")
    ev.add_argument("--niah-samples", type=int, default=32, metavar="N", help="samples per depth and length")
    ev.add_argument("--lm-eval-include", metavar="DIR", help="folder of lm-eval task YAML files (local data)")
    ev.add_argument("--lm-eval-limit", type=int, metavar="N", help="at most N documents per lm-eval task")
    ev.add_argument("--num-fewshot", type=int, metavar="N")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="greedy generation from an HF folder with the compressed cache")
    gen.add_argument("--model", required=True, help="an HF folder (export-hf, import-public) or a training run")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--tokenizer", metavar="PATH.model",
                     help="sentencepiece model, where the folder or run has none (or to replace its own)")
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--pattern", type=_parse_pattern, metavar="D,W,P[,K,S]",
                      help="decode with this sparse pattern in every layer (write --pattern=-1,W,P for D=-1)")
    mode.add_argument("--dense", action="store_true", help="dense attention with a full cache")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("RATPLUS_DEBUG", "") not in ("", "0")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return args.func(args)
    except (RatplusError, ValueError) as e:  # bad input or a run that cannot go on: one line, exit 2
        if debug:
            traceback.print_exc()
        command = " ".join(filter(None, (args.command, getattr(args, "prep_command", None))))
        print(f"ratplus {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

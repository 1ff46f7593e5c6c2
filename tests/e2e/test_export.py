"""``ratplus export-hf``: checkpoints of several layouts become HF folders whose model reproduces, on the
validation windows, exactly the validation losses the trainer logged (an independent end-to-end check of the
consolidation: the trainer computed them with its own sharded model)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ratplus_mega.cli import main
from ratplus_mega.data.eval_reader import build_val_reader
from ratplus_mega.data.streaming import DataLayout
from ratplus_mega.train.metrics import read_metrics

from .test_train import _run, _torchrun, _train_cmd

LAYOUTS = {
    "zero2": (1, ["parallel.zero_stage=2"]),
    "zero3": (1, ["parallel.zero_stage=3"]),
    "tp2-zero1": (2, ["parallel.tensor_parallel=2", "parallel.zero_stage=1"]),
    "pp2-zero1": (2, ["parallel.pipeline_parallel=2", "parallel.zero_stage=1"]),
    "cp2-zero2": (2, ["parallel.context_parallel=2", "parallel.zero_stage=2"]),
}


def _validation_loss(model, shards, attention_mode: str) -> float:
    reader = build_val_reader(f"{shards}/val", seq_len=128, vocab_size=512, eos_id=2,
                              layout=DataLayout(), batch_size=4, max_windows=16)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for inputs, labels in reader:
            logits = model(inputs, attention_mode=attention_mode).logits
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                     reduction="sum").item()
            tokens += (labels != -100).sum().item()
    return total / tokens


@pytest.mark.parametrize("layout", [pytest.param(k, marks=[pytest.mark.slow, pytest.mark.multiproc]) if n > 1
                                    else k for k, (n, _) in LAYOUTS.items()])
def test_export_reproduces_the_logged_validation_losses(tiny_shards, tmp_path, layout):
    nproc, overrides = LAYOUTS[layout]
    args = _train_cmd(tiny_shards, tmp_path / "run", "train.train_tokens=2048", "train.eval_tokens=2048",
                      "train.precision=fp32", *overrides)
    run = _run(args) if nproc == 1 else _torchrun(nproc, args[3:])
    assert run.returncode == 0, run.stderr[-3000:]
    [validation] = read_metrics(tmp_path / "run", "val")
    logged = {k[len("val/loss_"):]: v for k, v in validation.items() if k.startswith("val/loss_")}
    assert set(logged) == {"dense", "D8-W0-P0"}

    out = tmp_path / "hf"
    assert main(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--dtype", "fp32",
                 "--tokenizer", str(tiny_shards.parent / "tok.model")]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, local_files_only=True).float().eval()
    assert _validation_loss(model, tiny_shards, "dense") == pytest.approx(logged["dense"], abs=1e-4)
    assert _validation_loss(model, tiny_shards, "sparse") == pytest.approx(logged["D8-W0-P0"], abs=1e-4)


def test_export_refuses_a_folder_without_a_committed_checkpoint(tmp_path, capsys):
    assert main(["export-hf", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert "no committed checkpoint" in capsys.readouterr().err


def test_generate_from_a_training_run_equals_generate_from_its_export(tiny_shards, tmp_path, cli_imports):
    from ratplus_mega.inference.generate import generate_text

    run = _run(_train_cmd(tiny_shards, tmp_path / "run", "train.train_tokens=2048",
                          f"data.tokenizer={tiny_shards.parent / 'tok.model'}"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert main(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf"),
                 "--dtype", "fp32"]) == 0
    direct = generate_text(tmp_path / "run", "Document 3. The river", max_new_tokens=8)
    exported = generate_text(tmp_path / "hf", "Document 3. The river", max_new_tokens=8)
    assert direct.text == exported.text and direct.new_tokens == 8

    # Export needs no megatron-core (only DeepSpeed's ZeRO consolidation); generating needs neither.
    code, loaded, err = cli_imports(["export-hf", "--checkpoint", tmp_path / "run", "--out", tmp_path / "hf2",
                                     "--dtype", "fp32"], block=("megatron",))
    assert code == 0 and "megatron" not in loaded, err[-2000:]
    code, loaded, err = cli_imports(["generate", "--model", tmp_path / "hf2", "--prompt", "Document 3. The river",
                                     "--max-new-tokens", "4"], block=("megatron", "deepspeed"))
    assert code == 0 and loaded == [], err[-2000:]

"""lm-evaluation-harness through ``ratplus eval``: offline, on a local multiple-choice task; its
log-likelihoods equal those computed directly with the reference model under each pattern."""

import json

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ratplus_mega.cli import main
from ratplus_mega.config.schema import pattern_fields
from ratplus_mega.evaluation.models import open_model, parse_patterns
from ratplus_mega.evaluation.synthetic import KEYS, VALUES

TASK = """task: ratplus_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-task")
    docs = [{"question": " ".join(KEYS[i:i + 5]), "choices": VALUES[i:i + 3], "label": i % 3} for i in range(6)]
    (root / "tiny_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tiny_mc.yaml").write_text(TASK.format(data=root / "tiny_mc.jsonl"))
    return root, docs


def _direct(model, sp, question, choice) -> float:
    """log p(" " + choice | question) from the reference model and sentencepiece, as lm-eval's multiple
    choice asks for it."""
    context, whole = sp.encode(question), sp.encode(question + " " + choice)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids[:, :-1], attention_mode="sparse").logits[0], -1)
    n = len(whole) - len(context)
    return float(logprobs[-n:].gather(-1, ids[0, -n:, None]).sum())


def test_lm_eval_loglikelihoods_equal_the_reference_model_per_pattern(random_folder, word_tokenizer, tiny_task):
    from ratplus_mega.evaluation.harness import run_lm_eval

    root, docs = tiny_task
    sp = spm.SentencePieceProcessor(model_file=str(word_tokenizer))
    with open_model(random_folder) as loaded:
        for pattern in parse_patterns("dense,8:16:4"):
            loaded.set_pattern(pattern)
            model = AutoModelForCausalLM.from_pretrained(random_folder, trust_remote_code=True, local_files_only=True,
                                                         **pattern_fields(pattern)).float().eval()
            result = run_lm_eval(loaded, ["ratplus_tiny_mc"], include_path=str(root), log_samples=True)
            samples = sorted(result["samples"]["ratplus_tiny_mc"], key=lambda s: s["doc_id"])
            assert len(samples) == len(docs)
            for sample, doc in zip(samples, docs):
                got = [float(r[0][0]) for r in sample["resps"]]
                want = [_direct(model, sp, doc["question"], c) for c in doc["choices"]]
                assert got == pytest.approx(want, abs=1e-4)
            assert 0.0 <= result["results"]["ratplus_tiny_mc"]["acc,none"] <= 1.0


def test_ratplus_eval_runs_lm_eval_offline(random_folder, tiny_task, tmp_path, capsys):
    root, _ = tiny_task
    assert main(["eval", "--model", str(random_folder), "--patterns", "dense,own", "--tasks",
                 "lm-eval:ratplus_tiny_mc", "--lm-eval-include", str(root), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert {(r["task"], r["pattern"], r["metric"]) for r in rows} == {
        ("lm-eval:ratplus_tiny_mc", p, "acc") for p in ("dense", "D8-W0-P0")}
    assert "lm-eval:ratplus_tiny_mc acc" in capsys.readouterr().out

"""``ratplus generate`` on an HF folder: greedy tokens equal the argmax chain of full forward passes of the
reference model built from the same weights, with the sparse and the dense cache."""

import sentencepiece as spm
import torch

from ratplus_mega.cli import main
from ratplus_mega.config import load_config
from ratplus_mega.export.hf_folder import write_hf_folder
from ratplus_mega.hf import RatPlusForCausalLM
from ratplus_mega.inference.generate import generate_text
from ratplus_mega.model.init import reference_init_state_dict
from ratplus_mega.reference_layout import reference_config

TEXT = "the river keeps the stone and the bird sees the light over the road. " * 40


def _folder(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXT.split(". ")))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tok"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    cfg = load_config("configs/model/tiny.yaml", ["model.vocab_size=300", "model.pattern.dilation=4",
                                                  "model.pattern.window=3", "model.pattern.sinks=2"])
    config = reference_config(cfg.model)
    weights = reference_init_state_dict(cfg.model, seed=4)
    folder = write_hf_folder(tmp_path / "hf", config, weights, tmp_path / "tok.model", dtype=torch.float32)
    model = RatPlusForCausalLM(config).float().eval()
    model.load_state_dict(weights)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    return folder, model, sp


def _argmax_chain(model, ids, n, mode):
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids, attention_mode=mode).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_generate_matches_full_forward_argmax_chain(tmp_path):
    folder, model, sp = _folder(tmp_path)
    prompt = "the river keeps the stone"
    ids = torch.tensor([sp.encode(prompt)])
    for dense in (False, True):
        g = generate_text(folder, prompt, max_new_tokens=12, dense=dense)
        chain = _argmax_chain(model, ids, 12, "dense" if dense else "sparse")[0, ids.shape[1]:]
        expected_text = sp.decode(chain.tolist())
        assert g.new_tokens == 12 and g.prompt_tokens == ids.shape[1]
        assert g.text == expected_text
        total = ids.shape[1] + 12
        assert g.cache_bytes == model.cache_nbytes(total, attention_mode="dense" if dense else "sparse")
    assert generate_text(folder, prompt, max_new_tokens=4).pattern == "D4-W3-P2"
    assert generate_text(folder, prompt, max_new_tokens=4, pattern=(8, 0, 1)).pattern == "D8-W0-P1"


def test_generate_command_prints_stats_and_refuses_non_folders(tmp_path, capsys):
    folder, _, _ = _folder(tmp_path)
    assert main(["generate", "--model", str(folder), "--prompt", "the bird", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "5 new tokens" in out and "decode cache" in out and "[D4-W3-P2]" in out
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "neither an HF folder" in capsys.readouterr().err


def test_generate_with_per_head_and_top_k_patterns(tmp_path):
    """docs/spec.md §4.4, §4.5: a folder with per-head patterns decodes as its full forward; --pattern D,W,P,K,S
    switches every layer to top-k block attention at inference (and D,W,P switches it off again)."""
    folder, _, sp = _folder(tmp_path)
    cfg = load_config("configs/model/tiny.yaml", ["model.vocab_size=300", "model.pattern.dilation=[[1,4,4,-1],4]",
                                                  "model.pattern.window=[[0,0,3,2],1]"])
    weights = reference_init_state_dict(cfg.model, seed=4)
    heads = write_hf_folder(tmp_path / "heads", reference_config(cfg.model), weights, tmp_path / "tok.model",
                            dtype=torch.float32)
    prompt = "the river keeps the stone"
    ids = torch.tensor([sp.encode(prompt)])
    for path, overrides, name in [
        (heads, None, "per-layer:heads:dense+D4-W0-P0+D4-W3-P0+D-1-W2-P0,D4-W1-P0"),
        (folder, (-1, 0, 1, 3, 4), "D-1-W0-P1-top3x4"),
    ]:
        g = generate_text(path, prompt, max_new_tokens=10, pattern=overrides)
        fields = {} if overrides is None else dict(dilation=-1, window=0, sinks=1, topk_blocks=3, block_size=4)
        source = cfg if overrides is None else load_config("configs/model/tiny.yaml", ["model.vocab_size=300"])
        model = RatPlusForCausalLM(reference_config(source.model, **fields)).float().eval()
        model.load_state_dict(weights if overrides is None else reference_init_state_dict(source.model, seed=4))
        chain = _argmax_chain(model, ids, 10, "sparse")[0, ids.shape[1]:]
        assert (g.pattern, g.text) == (name, sp.decode(chain.tolist()))
        assert g.cache_bytes == model.cache_nbytes(ids.shape[1] + 10)
    assert generate_text(folder, prompt, max_new_tokens=2, pattern=(8, 0, 1)).pattern == "D8-W0-P1"

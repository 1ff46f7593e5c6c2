"""``write_hf_folder``: the folder loads offline through AutoModelForCausalLM (remote code) with the same logits,
stores the tied embedding once, shards with an index, and writes a tokenizer that encodes like sentencepiece."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from ratplus_mega.export.hf_folder import write_hf_folder

pytestmark = pytest.mark.usefixtures("single_thread")

FP32_VALUES = 1e-5  # docs/decisions.md "Tests", relative to the reference's scale
HF_CODE = Path(__file__).resolve().parents[2] / "ratplus_mega" / "hf"


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model(seed=3, dilation=4, window=3, sinks=2)


def ids(model, t=19):
    return torch.randint(0, model.config.vocab_size, (2, t), generator=torch.Generator().manual_seed(1))


def load(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()


def test_folder_loads_with_remote_code_and_same_logits(tmp_path, model, assert_close):
    out = write_hf_folder(tmp_path / "hf", model.config, model.state_dict(), dtype=torch.float32)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cache_layout.py", "config.json", "configuration_ratplus.py", "generation_config.json",
                     "model.safetensors", "modeling_ratplus.py"]
    for name in ("cache_layout.py", "configuration_ratplus.py", "modeling_ratplus.py"):
        assert (out / name).read_bytes() == (HF_CODE / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_ratplus.RatPlusConfig",
                                  "AutoModelForCausalLM": "modeling_ratplus.RatPlusForCausalLM"}
    assert (config["dilation"], config["window"], config["sinks"]) == (4, 3, 2)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2
    assert "auto_map" not in model.config.to_dict()  # the caller's config is not modified

    loaded = load(out)
    assert type(loaded).__module__.startswith("transformers_modules")  # the copied code, not the package's
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    x = ids(model)
    with torch.no_grad():
        assert_close("logits", loaded(x).logits, model(x).logits, FP32_VALUES)
        assert_close("dense logits", loaded(x, attention_mode="dense").logits,
                     model(x, attention_mode="dense").logits, FP32_VALUES)


def test_tied_embedding_stored_once_in_bf16(tmp_path, model, assert_close):
    from safetensors import safe_open

    state = dict(model.state_dict())
    assert "lm_head.weight" in state
    out = write_hf_folder(tmp_path / "hf", model.config, state)
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        embedding = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in keys
    assert keys == set(state) - {"lm_head.weight"}
    assert embedding.dtype == torch.bfloat16
    assert torch.equal(embedding, model.model.embed_tokens.weight.detach().bfloat16())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load(out, dtype=torch.float32)
    x = ids(model)
    with torch.no_grad():
        assert_close("bf16-stored logits", loaded(x).logits, model(x).logits, 5e-2)


def test_sharded_with_index(tmp_path, model, assert_close):
    limit = 40_000  # bytes; the tiny model in fp32 is ~100 kB
    out = write_hf_folder(tmp_path / "hf", model.config, model.state_dict(), dtype=torch.float32,
                          max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(shards)
    assert all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in expected.values())
    from safetensors.torch import load_file

    for name in shards:
        tensors = load_file(out / name)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1, (name, size)
    loaded = load(out)
    x = ids(model)
    with torch.no_grad():
        assert_close("logits", loaded(x).logits, model(x).logits, FP32_VALUES)


def test_generate_from_the_loaded_folder(tmp_path, model):
    loaded = load(write_hf_folder(tmp_path / "hf", model.config, model.state_dict(), dtype=torch.float32))
    prompt = ids(model, t=6)
    with torch.no_grad():
        ours = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=2)
        theirs = loaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("edit,match", [
    ("drop", r"missing \['model.layers.1.ffn.fc2.weight'\]"),
    ("extra", r"unknown \['model.layers.0.mixer.rotary.inv_freq'\]"),
    ("shape", r"model.norm.weight: shape \(31,\)"),
    ("untied", "differs from model.embed_tokens.weight"),
], ids=["missing-key", "unknown-key", "wrong-shape", "untied-head"])
def test_bad_state_dicts_raise_and_write_nothing(tmp_path, model, edit, match):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if edit == "drop":
        del state["model.layers.1.ffn.fc2.weight"]
    elif edit == "extra":
        state["model.layers.0.mixer.rotary.inv_freq"] = torch.ones(8)
    elif edit == "shape":
        state["model.norm.weight"] = torch.ones(31)
    else:
        state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(ValueError, match=match):
        write_hf_folder(tmp_path / "hf", model.config, state)
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite_and_failures_leave_no_partial_folder(tmp_path, model):
    out = tmp_path / "hf"
    write_hf_folder(out, model.config, model.state_dict())
    with pytest.raises(ValueError, match="already exists"):
        write_hf_folder(out, model.config, model.state_dict())
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="no such file"):  # fails after the weights were written
        write_hf_folder(out, model.config, model.state_dict(), tmp_path / "missing.model", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left behind
    assert (out / "model.safetensors").read_bytes() == before  # the old folder is intact
    write_hf_folder(out, model.config, model.state_dict(), dtype=torch.float32, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before


# ------------------------------------------------------------------------------------------------------------
# Tokenizer files
# ------------------------------------------------------------------------------------------------------------

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dilated", "attention", "recurrence", "model", "token", "über",
         "naïve", "日本", "42", "3.14", "\n", "\t"]


def train_sentencepiece(folder: Path, name: str, **options) -> Path:
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(1500)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / name), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2, **options)
    return folder / f"{name}.model"


@pytest.fixture(scope="module")
def sp_identity(tmp_path_factory):
    """A byte-fallback BPE model with the lossless settings of docs/decisions.md (identity normalisation)."""
    return train_sentencepiece(tmp_path_factory.mktemp("sp"), "identity", normalization_rule_name="identity",
                               remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)


TEXTS = ["the cat sat on a mat", "  two  spaces   and more", " leading space", "trailing space ", "line\n\nnext\tx",
         "über naïve 日本 ☃ 🙂 ∑", "digits 0123456789", "dilatedattentionrecurrence"]


def test_tokenizer_files_encode_like_sentencepiece(tmp_path, model, sp_identity):
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    out = write_hf_folder(tmp_path / "hf", model.config, model.state_dict(), sp_identity)
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is False and tok_config["add_eos_token"] is False
    sp = spm.SentencePieceProcessor(model_file=str(sp_identity))
    fast, slow = AutoTokenizer.from_pretrained(out), LlamaTokenizer.from_pretrained(out)
    assert fast.is_fast
    for text in TEXTS:
        assert fast(text)["input_ids"] == sp.encode(text), text
        assert slow(text)["input_ids"] == sp.encode(text), text
        assert fast.decode(sp.encode(text)) == text
    assert fast.eos_token_id == 2 and fast.bos_token_id == 1


def test_tokenizer_that_hf_cannot_reproduce_is_refused(tmp_path, model):
    """A model that collapses whitespace (remove_extra_whitespaces) has no faithful fast form."""
    sp_model = train_sentencepiece(tmp_path, "nfkc", normalization_rule_name="nmt_nfkc",
                                   remove_extra_whitespaces=True)
    with pytest.raises(ValueError, match="encodes .* sentencepiece as"):
        write_hf_folder(tmp_path / "hf", model.config, model.state_dict(), sp_model)
    assert not (tmp_path / "hf").exists()


def test_per_head_and_top_k_patterns_travel_in_the_folder(tmp_path, tiny_model, assert_close):
    """docs/spec.md §4.4, §4.5: config.json carries the per-head lists and the top-k fields, and the folder's own
    copied code runs them: the same logits, and the same decoded logits from its compressed cache."""
    model = tiny_model(seed=5, hidden_size=32, num_attention_heads=4, head_dim=8, dilation=[[1, 4, -1, 4], -1],
                       window=[[0, 2, 1, 2], 0], sinks=1, topk_blocks=[[0, 0, 3, 0], 3], block_size=4)
    out = write_hf_folder(tmp_path / "hf", model.config, model.state_dict(), dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["dilation"] == [[1, 4, -1, 4], -1] and config["topk_blocks"] == [[0, 0, 3, 0], 3]
    loaded = load(out)
    assert loaded.config.layer_patterns() == model.config.layer_patterns()
    x = ids(model, t=23)
    with torch.no_grad():
        ref = model(x).logits
        assert_close("logits", loaded(x).logits, ref, FP32_VALUES)
        cache = loaded(x[:, :9], use_cache=True, max_cache_len=23).past_key_values
        steps = torch.cat([loaded(x[:, t:t + 1], past_key_values=cache).logits for t in range(9, 23)], dim=1)
        assert_close("decoded logits", steps, ref[:, 9:], FP32_VALUES)

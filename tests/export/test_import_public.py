"""``ratplus import-public`` on synthetic checkpoints in the public RAT+ format (spec §9): same logits as a model
assembled by hand from the public tensors, offline loading of the written folder, and clear refusals."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import types

import pytest
import torch

from ratplus_mega.cli import main
from ratplus_mega.hf import RatPlusConfig, RatPlusForCausalLM

pytestmark = pytest.mark.usefixtures("single_thread")

FP32_VALUES = 1e-5  # docs/decisions.md "Tests", relative to the reference's scale
D, LAYERS, VOCAB, FFN = 256, 2, 97, 384  # head dim 128 -> 2 heads (64 -> 4)


def public_state(recurrence: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A public-format state dict: `_orig_mod.` prefixes at the front and inside, a legacy fgate_proj in
    layer 0 (recurrence only), and the tied head copy."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: 0.1 * torch.randn(*shape, generator=g)  # noqa: E731
    wte = rand(VOCAB, D)
    sd = {"_orig_mod.embedding.wte.weight": wte, "head.lm_head.weight": wte.clone(),
          "backbone.ln.weight": 1 + rand(D)}
    for i in range(LAYERS):
        p = f"backbone.layers.{i}."
        if recurrence and i == 0:
            sd[p + "seq_layer.in_proj.weight"] = rand(4 * D, D)
            sd[p + "seq_layer._orig_mod.fgate_proj.weight"] = 3 * rand(D, D)
        else:
            sd[p + "seq_layer.in_proj.weight"] = rand((5 if recurrence else 4) * D, D)
        sd[p + "seq_layer.input_norm.weight"] = 1 + rand(D)
        sd[f"_orig_mod.{p}seq_layer.out_proj.weight"] = rand(D, D)
        sd[p + "hidden_layer.ln.weight"] = 1 + rand(D)
        sd[p + "hidden_layer.fc1.weight"] = rand(FFN, D)
        sd[p + "hidden_layer.fc2.weight"] = rand(D, FFN)
    return sd


def public_config(d_head=128, **seq_cell) -> dict:
    """The public trainer's resolved config, as far as the importer reads it: the attention layer's section
    ``model.backbone.seq_cell`` (its ``num_head`` is ``d_model // d_head``) beside others it ignores."""
    layer = {"_name_": "ratplus", "d_model": D, "d_head": d_head, "num_head": D // d_head if d_head else None,
             "dilation_size": 64, "local_size": 0, "initial_size": 0, "apply_re": True, "joint_train": True}
    layer.update(seq_cell)
    return {"model": {"backbone": {"n_layer": LAYERS, "seq_cell": layer, "hidden_cell": {"d_model": D}},
                      "embedding": {"vocab_size": VOCAB}},
            "trainer": {"dtype": "bfloat16"}}


def save_checkpoint(path, state, **extra):
    """As the public trainer does: weights under 'task' beside a config and training state."""
    ckpt = {"task": state, "config": public_config(),
            "step": 52451, "optimizer": {"state": {}, "param_groups": [{"lr": 8e-4, "params": [0]}]},
            "lr_scheduler": {"last_epoch": 3}, "resume_kwargs": {"resume_step": 52451}}
    ckpt.update(extra)
    torch.save(ckpt, path)
    return path


def public(state, key):
    """A tensor by its public name, wherever `_orig_mod.` sits."""
    return next(v for k, v in state.items() if k.replace("_orig_mod.", "") == key)


def hand_built(state, recurrence=True, head_dim=128, **pattern) -> RatPlusForCausalLM:
    """The reference model with every weight copied from the public tensors by hand."""
    config = RatPlusConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS,
                           num_attention_heads=D // head_dim, head_dim=head_dim, intermediate_size=FFN,
                           apply_recurrence=recurrence, **pattern)
    model = RatPlusForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(public(state, "embedding.wte.weight"))
        model.model.norm.weight.copy_(public(state, "backbone.ln.weight"))
        for i, layer in enumerate(model.model.layers):
            p = f"backbone.layers.{i}."
            in_proj = public(state, p + "seq_layer.in_proj.weight")
            if in_proj.shape[0] == 4 * D and recurrence:
                in_proj = torch.cat([in_proj, public(state, p + "seq_layer.fgate_proj.weight")])
            layer.mixer.in_proj.weight.copy_(in_proj)
            layer.mixer.out_proj.weight.copy_(public(state, p + "seq_layer.out_proj.weight"))
            layer.input_norm.weight.copy_(public(state, p + "seq_layer.input_norm.weight"))
            layer.ffn_norm.weight.copy_(public(state, p + "hidden_layer.ln.weight"))
            layer.ffn.fc1.weight.copy_(public(state, p + "hidden_layer.fc1.weight"))
            layer.ffn.fc2.weight.copy_(public(state, p + "hidden_layer.fc2.weight"))
    return model


def load_folder(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def tokens(t=23):
    return torch.randint(0, VOCAB, (2, t), generator=torch.Generator().manual_seed(4))


CASES = {
    "rat+-legacy-fgate-dense": (True, [], {}),
    "rat+-pattern-D4-W3-P2": (True, ["--pattern", "4,3,2"], dict(dilation=4, window=3, sinks=2)),
    "no-recurrence-D-1-W5-P1": (False, ["--pattern=-1,5,1"], dict(dilation=-1, window=5, sinks=1)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_import_gives_hand_built_logits(tmp_path, capsys, assert_close, case):
    recurrence, pattern_args, pattern = CASES[case]
    state = public_state(recurrence)
    ckpt = save_checkpoint(tmp_path / "52451.pth", state)
    out = tmp_path / "hf"
    assert main(["import-public", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", "fp32", *pattern_args]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (D, LAYERS, 2)
    assert (config["intermediate_size"], config["vocab_size"], config["apply_recurrence"]) == (FFN, VOCAB, recurrence)
    loaded = load_folder(out)
    ref = hand_built(state, recurrence, **pattern)
    x = tokens()
    with torch.no_grad():
        assert_close("logits", loaded(x).logits, ref(x).logits, FP32_VALUES)


def test_head_dim_64_is_read_from_the_config(tmp_path, capsys, assert_close):
    """d_head = 64 (the public layer config's default): 4 heads of 64 on a 256-wide model, whose logits differ
    from the 2 heads of 128 the importer once assumed."""
    state = public_state()
    ckpt = save_checkpoint(tmp_path / "a.pth", state, config=public_config(d_head=64))
    out = tmp_path / "hf"
    assert main(["import-public", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", "fp32",
                 "--pattern", "4,3,2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["head_dim"]) == (4, 64)
    loaded, x = load_folder(out), tokens()
    with torch.no_grad():
        got = loaded(x).logits
        assert_close("logits", got, hand_built(state, head_dim=64, dilation=4, window=3, sinks=2)(x).logits,
                     FP32_VALUES)
        wrong = hand_built(state, head_dim=128, dilation=4, window=3, sinks=2)(x).logits
    assert (got - wrong).abs().max() > 0.1 * wrong.abs().max()


def test_head_dim_only_from_the_command_line_for_a_weights_only_file(tmp_path, assert_close):
    state = public_state()
    torch.save({"task": state}, tmp_path / "a_wonly.pth")
    out = tmp_path / "hf"
    assert main(["import-public", "--checkpoint", str(tmp_path / "a_wonly.pth"), "--out", str(out), "--dtype", "fp32",
                 "--head-dim", "64"]) == 0
    x = tokens()
    with torch.no_grad():
        assert_close("logits", load_folder(out)(x).logits, hand_built(state, head_dim=64)(x).logits, FP32_VALUES)


HEAD_REFUSALS = {
    "d-model-differs": (dict(config=public_config(d_model=512)), [],
                        r"says d_model 512, but the tensors are 256 wide"),
    "heads-times-dim": (dict(config=public_config(d_head=64, num_head=2)), [],
                        r"num_head 2 x d_head 64 = 128, but the tensors are 256 wide"),
    "num-head-only-not-dividing": (dict(config=public_config(d_head=None, num_head=3)), [],
                                   r"num_head 3, which does not divide the tensors' width 256"),
    "dim-not-dividing": (dict(config=public_config(d_head=96, num_head=None)), [],
                         r"hidden size 256 is not a multiple of the head dim 96"),
    "no-config": (dict(config=None), [], r"gives no d_head or num_head; pass --head-dim"),
    "flag-disagrees": ({}, ["--head-dim", "64"], r"--head-dim 64 disagrees with .* which gives head dim 128"),
}


@pytest.mark.parametrize("case", list(HEAD_REFUSALS), ids=list(HEAD_REFUSALS))
def test_config_and_tensors_that_disagree_are_refused(tmp_path, capsys, case):
    extra, flags, message = HEAD_REFUSALS[case]
    ckpt = save_checkpoint(tmp_path / "a.pth", public_state(), **extra)
    assert main(["import-public", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ratplus import-public: error: public checkpoint:") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "hf").exists()


def test_pattern_file_per_layer(tmp_path, assert_close):
    state = public_state()
    ckpt = save_checkpoint(tmp_path / "a.pth", state)
    pattern_file = tmp_path / "pattern.yaml"
    pattern_file.write_text("dilation: [1, 4]\nwindow: [0, 2]\nsinks: 3\n")
    assert main(["import-public", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--dtype", "fp32",
                 "--pattern-file", str(pattern_file)]) == 0
    loaded = load_folder(tmp_path / "hf")
    assert loaded.config.layer_patterns() == [(1, 0, 3), (4, 2, 3)]
    ref = hand_built(state, dilation=[1, 4], window=[0, 2], sinks=3)
    x = tokens()
    with torch.no_grad():
        assert_close("logits", loaded(x).logits, ref(x).logits, FP32_VALUES)


def test_bf16_default_and_sharding_through_the_library(tmp_path, assert_close):
    from ratplus_mega.export import public_to_hf, write_hf_folder

    state = public_state()
    config, converted = public_to_hf(save_checkpoint(tmp_path / "a.pth", state), dilation=8)
    out = write_hf_folder(tmp_path / "hf", config, converted, max_shard_bytes=400_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype="auto").eval()
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    ref = hand_built(state, dilation=8)
    x = tokens()
    with torch.no_grad():
        assert_close("bf16 logits", loaded.float()(x).logits, ref(x).logits, 5e-2)


# ------------------------------------------------------------------------------------------------------------
# Refusals: each names what is wrong
# ------------------------------------------------------------------------------------------------------------


def edited(edit):
    state = public_state()
    if edit == "missing":
        del state["backbone.layers.1.hidden_layer.fc2.weight"]
    elif edit == "missing-embedding":
        del state["_orig_mod.embedding.wte.weight"]
    elif edit == "unknown":
        state["backbone.layers.0.seq_layer.rotary.inv_freq"] = torch.ones(64)
    elif edit == "untied":
        state["head.lm_head.weight"] = state["head.lm_head.weight"] + 1
    elif edit == "in-proj-rows":
        state["backbone.layers.1.seq_layer.in_proj.weight"] = torch.zeros(3 * D, D)
    elif edit == "mixed-recurrence":
        state["backbone.layers.1.seq_layer.in_proj.weight"] = torch.zeros(4 * D, D)
    elif edit == "duplicate":
        state["embedding._orig_mod.wte.weight"] = state["_orig_mod.embedding.wte.weight"]
    elif edit == "ffn-mismatch":
        state["backbone.layers.1.hidden_layer.fc2.weight"] = torch.zeros(D, FFN + 1)
    return state


REFUSALS = {
    "missing": r"missing \['backbone.layers.1.hidden_layer.fc2.weight'\]",
    "missing-embedding": r"missing \['model.embed_tokens.weight'\]",
    "unknown": r"unknown keys \['backbone.layers.0.seq_layer.rotary.inv_freq'\]",
    "untied": "untied head",
    "in-proj-rows": r"layer 1 in_proj has shape \(768, 256\)",
    "mixed-recurrence": "some layers have the forget gate",
    "duplicate": "both map to 'embedding.wte.weight'",
    "ffn-mismatch": r"model.layers.1.ffn.fc2.weight: shape \(256, 385\)",
}


@pytest.mark.parametrize("edit", list(REFUSALS), ids=list(REFUSALS))
def test_bad_state_dicts_are_refused_with_names(tmp_path, capsys, edit):
    ckpt = save_checkpoint(tmp_path / "a.pth", edited(edit))
    assert main(["import-public", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ratplus import-public: error:") and len(err.splitlines()) == 1, err
    assert re.search(REFUSALS[edit], err), err
    assert not (tmp_path / "hf").exists()


def test_unlisted_class_is_refused_by_name(tmp_path, capsys, monkeypatch):
    # A class of the trainer's own (libraries imported by other tests may allow-list common ones such as
    # argparse.Namespace process-wide, which is safe but would not exercise the refusal).
    opaque = fake_module(monkeypatch, "public_trainer_state", "TrainerState")
    ckpt = save_checkpoint(tmp_path / "a.pth", public_state(), args=opaque())
    assert main(["import-public", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "public_trainer_state.TrainerState" in err and "re-save only its weights" in err, err


def fake_module(monkeypatch, name: str, cls_name: str, base: type = object) -> type:
    """Register a stand-in module ``name`` holding class ``cls_name`` (pickled by reference under that name)."""
    module = types.ModuleType(name)
    cls = type(cls_name, (base,), {"__module__": name, "__qualname__": cls_name})
    setattr(module, cls_name, cls)
    monkeypatch.setitem(sys.modules, name, module)
    return cls


def test_easydict_config_loads_without_easydict(tmp_path, monkeypatch):
    """The public trainer stores its config as an EasyDict (a dict subclass with mirrored attributes); the
    importer reads it as a plain mapping, whether or not easydict is installed."""
    from ratplus_mega.export import load_public_checkpoint, public_to_hf

    easy = fake_module(monkeypatch, "easydict", "EasyDict", dict)

    def easydict(**items):  # EasyDict mirrors items as attributes: the pickle carries both
        value = easy(**items)
        value.__dict__.update(items)
        return value

    layer = easydict(d_model=D, d_head=64, num_head=4)
    config = easydict(model=easydict(backbone=easydict(seq_cell=layer)), trainer=easydict(dtype="bfloat16"))
    state = public_state()
    ckpt = save_checkpoint(tmp_path / "a.pth", state, config=config)
    monkeypatch.delitem(sys.modules, "easydict")
    loaded = load_public_checkpoint(ckpt)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    config, _ = public_to_hf(ckpt)
    assert (config.num_attention_heads, config.head_dim) == (4, 64)


def test_allow_listed_class_that_is_not_installed_says_what_to_install(tmp_path, monkeypatch):
    from ratplus_mega.export import load_public_checkpoint

    if importlib.util.find_spec("omegaconf") is not None:
        pytest.skip("omegaconf is installed here")
    monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    dict_config = fake_module(monkeypatch, "omegaconf.dictconfig", "DictConfig")
    ckpt = save_checkpoint(tmp_path / "a.pth", public_state(), config=dict_config())
    monkeypatch.delitem(sys.modules, "omegaconf.dictconfig")
    monkeypatch.delitem(sys.modules, "omegaconf")
    with pytest.raises(ValueError, match=r"omegaconf.dictconfig.DictConfig; install .*pip install omegaconf"):
        load_public_checkpoint(ckpt)


def test_file_without_task_entry(tmp_path):
    from ratplus_mega.export import load_public_checkpoint

    torch.save({"model": public_state()}, tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"expected a dict with a 'task' state dict .*\['model'\]"):
        load_public_checkpoint(tmp_path / "a.pth")
    with pytest.raises(ValueError, match="no such file"):
        load_public_checkpoint(tmp_path / "missing.pth")


@pytest.mark.parametrize("text,match", [
    ("dilation: [1, 4, 4]\n", "per-layer list needs 2 entries"),
    ("dilation: 0\n", "dilation must be >= 1 or -1"),
    ("stride: 4\n", "expected a mapping with keys dilation, window, sinks"),
    ("window: two\n", "window must be an int or a list of ints"),
], ids=["list-length", "dilation-0", "unknown-key", "wrong-type"])
def test_bad_pattern_files(tmp_path, capsys, text, match):
    ckpt = save_checkpoint(tmp_path / "a.pth", public_state())
    (tmp_path / "p.yaml").write_text(text)
    assert main(["import-public", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"),
                 "--pattern-file", str(tmp_path / "p.yaml")]) == 2
    assert match in capsys.readouterr().err


def test_import_public_imports_neither_megatron_nor_deepspeed(tmp_path, cli_imports):
    ckpt = save_checkpoint(tmp_path / "a.pth", public_state())
    code, loaded, err = cli_imports(["import-public", "--checkpoint", ckpt, "--out", tmp_path / "hf"],
                                    block=("megatron", "deepspeed"))
    assert code == 0 and loaded == [], err[-2000:]

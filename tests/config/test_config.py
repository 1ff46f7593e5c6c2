"""Config loading: presets, overrides, every validation error, the dump/reload round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ratplus_mega.config import (
    CONFIG_ROOT, ConfigLoadError, ModelConfig, PatternConfig, dump_config, load_config,
)

pytestmark = pytest.mark.usefixtures("single_thread")

PRESETS = {name: CONFIG_ROOT / "model" / f"{name}.yaml" for name in ("tiny", "ratplus-1.5b", "ratplus-2.6b")}


# ------------------------------------------------------------------------------------------------------------
# Loading and overrides
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,layers,hidden,heads,ffn,dilation", [
    ("tiny", 2, 64, 4, 256, 8), ("ratplus-1.5b", 24, 2048, 16, 8192, 64), ("ratplus-2.6b", 28, 2560, 20, 10240, 64),
], ids=["tiny", "1.5b", "2.6b"])
def test_presets_load(name, layers, hidden, heads, ffn, dilation):
    m = load_config(PRESETS[name]).model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.ffn_hidden_size) == (layers, hidden, heads, ffn)
    assert m.pattern == PatternConfig(dilation=dilation, window=0, sinks=0)
    assert (m.norm_eps, m.rope_theta, m.eos_token_id, m.apply_recurrence) == (1e-6, 10000.0, 2, True)
    assert m.layer_patterns() == [(dilation, 0, 0)] * layers


def test_overrides_of_every_kind():
    cfg = load_config(PRESETS["tiny"], [
        "model.num_layers=3",  # int
        "model.rope_theta=5e5",  # YAML 1.1 reads this as a string: coerced to float
        "model.norm_eps=0.001",
        "model.apply_recurrence=false",  # bool
        "model.pattern.dilation=[1,4,-1]",  # per-layer list, nested section
        "model.pattern.window=2",
        "train.adam_betas=[0.8, 0.99]",  # list of floats in a section the file does not have
        "train.joint=true",
        "data.train=[a, b]",
    ])
    m = cfg.model
    assert m.num_layers == 3 and m.rope_theta == 500000.0 and isinstance(m.rope_theta, float)
    assert m.norm_eps == 0.001 and m.apply_recurrence is False
    assert m.layer_patterns() == [(1, 2, 0), (4, 2, 0), (-1, 2, 0)]
    assert cfg.train.adam_betas == [0.8, 0.99] and cfg.train.joint is True
    assert cfg.data.train == ["a", "b"]
    assert m.vocab_size == 512  # untouched fields keep the preset's values


def test_int_where_float_expected_is_accepted():
    assert load_config(PRESETS["tiny"], ["model.rope_theta=20000"]).model.rope_theta == 20000.0


def test_no_file_gives_defaults():
    cfg = load_config(None, ["model.num_layers=2", "model.pattern.dilation=[1,64]"])
    assert cfg.model.hidden_size == 2048 and cfg.model.layer_patterns() == [(1, 0, 0), (64, 0, 0)]


def test_per_head_and_top_k_patterns_resolve_as_the_reference_model_does():
    """docs/spec.md §4.4, §4.5: per layer, an int or one entry per head; the training config and the HF config
    built from it give the same layer patterns, and the dump reloads to them."""
    from ratplus_mega.config.schema import pattern_name
    from ratplus_mega.reference_layout import reference_config

    cfg = load_config(PRESETS["tiny"], ["model.pattern.dilation=[[1,1,16,16],-1]", "model.pattern.sinks=[[0,4,4,4],2]",
                                        "model.pattern.topk_blocks=[0,8]", "model.pattern.block_size=16"])
    patterns = cfg.model.layer_patterns()
    assert patterns == [((1, 0, 0), (1, 0, 4), (16, 0, 4), (16, 0, 4)), (-1, 0, 2, 8, 16, "max")]
    assert reference_config(cfg.model).layer_patterns() == patterns
    assert pattern_name(patterns) == "per-layer:heads:2xdense+2xD16-W0-P4,D-1-W0-P2-top8x16"
    assert load_config(None, []).model.pattern.is_dense
    reloaded = yaml.safe_load(dump_config(cfg))["model"]["pattern"]
    assert reloaded["dilation"] == [[1, 1, 16, 16], -1] and reloaded["topk_blocks"] == [0, 8]


# ------------------------------------------------------------------------------------------------------------
# Validation errors: each names the dotted key and where the value came from
# ------------------------------------------------------------------------------------------------------------

OVERRIDE_ERRORS = {
    "hidden-not-divisible-by-head-dim": ("model.hidden_size=100", "model.hidden_size", "divisible by head_dim"),

    "dilation-0": ("model.pattern.dilation=0", "model.pattern.dilation", ">= 1 or -1"),
    "dilation-minus-2": ("model.pattern.dilation=-2", "model.pattern.dilation", ">= 1 or -1"),
    "dilation-list-entry": ("model.pattern.dilation=[4,0]", "model.pattern.dilation[1]", ">= 1 or -1"),
    "window-negative": ("model.pattern.window=-1", "model.pattern.window", ">= 0"),
    "sinks-negative": ("model.pattern.sinks=-3", "model.pattern.sinks", ">= 0"),
    "per-layer-length": ("model.pattern.sinks=[1,2,3]", "model.pattern.sinks", "one entry per layer (2), got 3"),
    "unknown-key": ("model.hiden_size=3", "model.hiden_size", "unknown key"),
    "unknown-nested-key": ("model.pattern.stride=3", "model.pattern.stride", "unknown key"),
    "unknown-section": ("optimizer.lr=1", "optimizer", "unknown key"),
    "int-got-str": ("model.num_layers=two", "model.num_layers", "expected int"),
    "int-got-float": ("model.num_layers=2.5", "model.num_layers", "expected int"),
    "int-got-bool": ("model.num_layers=true", "model.num_layers", "expected int"),
    "bool-got-int": ("model.apply_recurrence=1", "model.apply_recurrence", "expected bool"),
    "float-got-str": ("model.norm_eps=tiny", "model.norm_eps", "expected float"),
    "list-got-str": ("model.pattern.dilation=abc", "model.pattern.dilation", "expected int or a list of int"),
    "section-got-scalar": ("model.pattern=3", "model.pattern", "expected a mapping"),
    "literal": ("train.precision=fp16", "train.precision", "must be one of"),
    "layers-zero": ("model.num_layers=0", "model.num_layers", ">= 1"),
    "eos-outside-vocab": ("model.eos_token_id=512", "model.eos_token_id", "below vocab_size"),
    "tp-divides-heads": ("parallel.tensor_parallel=3", "parallel.tensor_parallel", "must divide num_heads"),
    "joint-needs-sparse": ("train.joint=true", "train.joint", "sparse"),
    "head-dim-odd": ("model.head_dim=1", "model.head_dim", "must be even"),
    "ffn-zero": ("model.ffn_hidden_size=0", "model.ffn_hidden_size", ">= 1"),
    "pp-divides-layers": ("parallel.pipeline_parallel=3", "parallel.pipeline_parallel", "must divide num_layers"),
    "cp-divides-seq": ("parallel.context_parallel=3", "parallel.context_parallel", "does not split into 6 zigzag"),
    "zero-stage": ("parallel.zero_stage=4", "parallel.zero_stage", "0, 1, 2 or 3"),
    "sp-needs-tp": ("parallel.sequence_parallel=true", "parallel.sequence_parallel", "tensor_parallel > 1"),
    "tp-zero": ("parallel.tensor_parallel=0", "parallel.tensor_parallel", ">= 1"),
    "train-weights-length": ("data.train_weights=[1.0]", "data.train_weights", "one weight per train entry"),
    "canonical-nodes": ("data.num_canonical_nodes=0", "data.num_canonical_nodes", ">= 1"),
    "workers": ("data.num_workers=-1", "data.num_workers", ">= 0"),
    "sampler": ("data.sampler=random", "data.sampler", "must be one of"),
    "min-lr": ("train.min_lr=1.0", "train.min_lr", "min_lr <= lr"),
    "warmup": ("train.warmup_fraction=1.0", "train.warmup_fraction", "[0, 1)"),
    "grad-clip": ("train.grad_clip=0", "train.grad_clip", "> 0"),
    "global-batch": ("train.global_batch_size=7", "train.global_batch_size", "multiple of micro_batch_size"),
    "eval-pattern-length": ("train.eval_patterns=[{dilation: [1, 2, 3]}]", "train.eval_patterns[0].dilation",
                            "one entry per layer"),
    "eval-pattern-value": ("train.eval_patterns=[{window: -2}]", "train.eval_patterns[0].window", ">= 0"),
    "per-head-length": ("model.pattern.dilation=[[1,4,4],1]", "model.pattern.dilation[0]",
                        "one entry per head (4), got 3"),
    "per-head-value": ("model.pattern.sinks=[0,[0,1,-2,0]]", "model.pattern.sinks[1][2]", ">= 0"),
    "eval-per-head-length": ("train.eval_patterns=[{window: [[1,2],0]}]", "train.eval_patterns[0].window[0]",
                             "one entry per head (4), got 2"),
    "topk-one": ("model.pattern.topk_blocks=[0,[2,0,1,0]]", "model.pattern.topk_blocks[1][2]", "0 (off) or >= 2"),
    "block-size": ("model.pattern.block_size=0", "model.pattern.block_size", ">= 1"),
    "block-score": ("model.pattern.block_score=sum", "model.pattern.block_score", "must be one of"),
}


@pytest.mark.parametrize("case", list(OVERRIDE_ERRORS), ids=list(OVERRIDE_ERRORS))
def test_override_errors_name_key_and_override(case):
    override, key, rule = OVERRIDE_ERRORS[case]
    extra = {"joint-needs-sparse": ["model.pattern.dilation=1"], "train-weights-length": ["data.train=[a, b]"],
             "global-batch": ["train.micro_batch_size=2"], "head-dim-odd": ["model.num_heads=64"]}
    overrides = [override] + extra.get(case, [])
    with pytest.raises(ConfigLoadError) as err:
        load_config(PRESETS["tiny"], overrides)
    message = str(err.value)
    assert f"'{key}'" in message, message
    assert rule in message, message
    assert f"override {override!r}" in message, message
    assert "\n" not in message


def test_error_on_a_file_value_broken_by_an_override_names_the_file_line():
    """hidden_size=128 from an override breaks num_heads * head_dim, whose value sits in the preset file."""
    with pytest.raises(ConfigLoadError) as err:
        load_config(PRESETS["tiny"], ["model.hidden_size=128"])
    assert "'model.num_heads'" in str(err.value) and "must equal hidden_size" in str(err.value)
    assert f"{PRESETS['tiny']}:6" in str(err.value), str(err.value)


def test_malformed_override():
    with pytest.raises(ConfigLoadError, match="not of the form key.sub=value"):
        load_config(PRESETS["tiny"], ["model.num_layers"])
    with pytest.raises(ConfigLoadError, match="not of the form"):
        load_config(PRESETS["tiny"], ["model..x=1"])
    with pytest.raises(ConfigLoadError, match="is not a section"):
        load_config(PRESETS["tiny"], ["model.num_layers.x=1"])


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,key,line", [
    ("model:\n  num_layers: 2\n  hidden_size: 100\n  head_dim: 16\n  num_heads: 4\n", "model.hidden_size", 3),
    ("model:\n  pattern:\n    dilation: 0\n", "model.pattern.dilation", 3),
    ("model:\n  num_layers: 2\n  pattern:\n    window: [1, 2, 3]\n", "model.pattern.window", 4),
    ("train:\n  lr: 1.0e-3\n  bogus: 1\n", "train.bogus", 3),
    ("model:\n  vocab_size: many\n", "model.vocab_size", 2),
    ("model:\n  num_layers: 2\n  num_heads: 4\n  head_dim: 16\n  hidden_size: 64\n  pattern:\n"
     "    dilation: [[1, 16, 16, 64], 4]\n    window:\n      - 0\n      - [0, 8, 8]\n", "model.pattern.window[1]", 8),
], ids=["hidden-size", "dilation", "window-list-length", "unknown-key", "wrong-type", "per-head-list-length"])
def test_file_errors_name_key_and_file_line(tmp_path, text, key, line):
    path = write(tmp_path, "run.yaml", text)
    with pytest.raises(ConfigLoadError) as err:
        load_config(path)
    assert f"'{key}'" in str(err.value) and f"{path}:{line}" in str(err.value), str(err.value)


def test_errors_in_a_preset_name_the_preset_file_line(tmp_path):
    write(tmp_path, "model/broken.yaml", "model:\n  num_layers: 2\n  pattern: {dilation: 4, sinks: -1}\n")
    run = write(tmp_path, "train/run.yaml", "model:\n  preset: broken\n")
    with pytest.raises(ConfigLoadError) as err:
        load_config(run)
    assert "'model.pattern.sinks'" in str(err.value) and "broken.yaml:3" in str(err.value), str(err.value)


@pytest.mark.parametrize("text,match", [
    ("model: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
], ids=["bad-yaml", "not-a-mapping"])
def test_unreadable_files(tmp_path, text, match):
    with pytest.raises(ConfigLoadError, match=match):
        load_config(write(tmp_path, "run.yaml", text))


def test_missing_file():
    with pytest.raises(ConfigLoadError, match="cannot read config file"):
        load_config("/nonexistent/run.yaml")


# ------------------------------------------------------------------------------------------------------------
# Presets and the dump/reload round trip
# ------------------------------------------------------------------------------------------------------------


def test_preset_by_name_with_run_file_overrides(tmp_path):
    run = write(tmp_path, "run.yaml", "model:\n  preset: ratplus-1.5b\n"
                                      "  pattern: {dilation: 16, window: 256, sinks: 4}\n"
                                      "train:\n  phase: adapt\n  lr: 8.0e-5\n")
    cfg = load_config(run, ["model.pattern.sinks=8"])
    assert cfg.model.preset == "ratplus-1.5b"
    assert cfg.model.hidden_size == 2048 and cfg.model.num_layers == 24
    assert cfg.model.pattern == PatternConfig(dilation=16, window=256, sinks=8)
    assert cfg.train.phase == "adapt" and cfg.train.lr == 8e-5


def test_preset_by_path_and_chained_presets(tmp_path):
    write(tmp_path, "model/base.yaml", "model:\n  preset: tiny\n  num_layers: 4\n")
    run = write(tmp_path, "run.yaml", "model:\n  preset: model/base.yaml\n  hidden_size: 32\n  num_heads: 2\n")
    m = load_config(run).model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.vocab_size) == (4, 32, 2, 512)


def test_preset_errors(tmp_path):
    with pytest.raises(ConfigLoadError, match="no preset 'nope'"):
        load_config(write(tmp_path, "a.yaml", "model:\n  preset: nope\n"))
    write(tmp_path, "model/x.yaml", "model:\n  preset: y\n")
    write(tmp_path, "model/y.yaml", "model:\n  preset: x\n")
    with pytest.raises(ConfigLoadError, match="cycle"):
        load_config(write(tmp_path, "b.yaml", "model:\n  preset: model/x.yaml\n"))
    write(tmp_path, "model/z.yaml", "model:\n  num_layers: 2\ntrain:\n  lr: 1.0\n")
    with pytest.raises(ConfigLoadError, match="only a 'model' section"):
        load_config(write(tmp_path, "c.yaml", "model:\n  preset: model/z.yaml\n"))


def test_dump_reload_round_trip(tmp_path):
    cfg = load_config(PRESETS["ratplus-2.6b"], [
        "model.pattern.window=[0,64]", "model.num_layers=2", "train.eval_patterns=[{dilation: 16, window: 256}]",
        "train.adam_eps=1e-6", "data.train_weights=[0.25]", "data.train=[/data/a]",
    ])
    text = dump_config(cfg)
    reloaded = load_config(write(tmp_path, "resolved.yaml", text))
    assert reloaded == cfg
    assert isinstance(reloaded.train.eval_patterns[0], PatternConfig)

    preset_cfg = load_config(write(tmp_path, "run.yaml", "model:\n  preset: tiny\n"))
    text = dump_config(preset_cfg)
    assert text.startswith("# model preset: tiny\n")
    reloaded = load_config(write(tmp_path, "resolved2.yaml", text))
    assert reloaded.model.preset is None and reloaded.model == ModelConfig(**{
        **vars(preset_cfg.model), "preset": None})
    assert yaml.safe_load(text)["model"]["ffn_hidden_size"] == 256


def test_context_parallel_layouts_are_checked_at_load():
    load_config("configs/train/tiny-cpu.yaml", ["parallel.context_parallel=2"])
    cfg = load_config("configs/train/adapt-1.5b-32k-cp8.yaml")
    assert (cfg.parallel.context_parallel, cfg.model.seq_len) == (8, 32768)
    # 128 tokens make 8 zigzag chunks at CP 4 (16 each), not 16 at CP 8, nor 8 chunks each over 3 SP ranks
    load_config("configs/train/tiny-cpu.yaml", ["parallel.context_parallel=4"])
    with pytest.raises(ConfigLoadError, match=r"parallel.context_parallel.*does not split into 16 zigzag chunks"):
        load_config("configs/train/tiny-cpu.yaml", ["parallel.context_parallel=8", "model.seq_len=120"])
    load_config("configs/train/tiny-cpu.yaml", ["parallel.context_parallel=8", "model.seq_len=120",
                                                "parallel.context_parallel_order=contiguous"])
    with pytest.raises(ConfigLoadError, match=r"each split over 2 sequence-parallel ranks"):
        load_config("configs/train/tiny-cpu.yaml", ["parallel.context_parallel=4", "model.seq_len=136",
                                                    "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"])
    with pytest.raises(ConfigLoadError, match=r"'model.pattern.topk_blocks'.*top-k block attention runs on whole"):
        load_config("configs/train/tiny-cpu.yaml", ["parallel.context_parallel=2", "model.pattern.topk_blocks=4"])
    with pytest.raises(ConfigLoadError, match=r"train.eval_patterns\[0\].topk_blocks"):
        load_config("configs/train/tiny-cpu.yaml", ["parallel.context_parallel=2",
                                                    "train.eval_patterns=[{dilation: 8, topk_blocks: 4}]"])

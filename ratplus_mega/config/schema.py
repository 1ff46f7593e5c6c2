"""Typed run configuration: one keyword-only dataclass per concern.

Each dataclass checks its own fields in ``__post_init__``; rules that span sections live in
``RunConfig.validate``. Every error is a :class:`ConfigError` that names the dotted key and the rule, so
the loader can add the file and line the value came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

PerLayerHead = Union[int, list[Union[int, list[int]]]]
"""An int for every layer and head, or one entry per layer, each an int or one int per head."""


class ConfigError(ValueError):
    """A configuration value broke a rule. ``key`` is the dotted path of the offending value."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


def _per_layer(key: str, value: PerLayerHead, num_layers: int, num_heads: int | None = None) -> list:
    """One entry per layer: an int, or (per head) a tuple of ``num_heads`` ints."""
    if isinstance(value, list):
        if len(value) != num_layers:
            raise ConfigError(key, f"a per-layer list needs one entry per layer ({num_layers}), got {len(value)}")
        out = []
        for i, v in enumerate(value):
            if isinstance(v, list):
                if num_heads is not None and len(v) != num_heads:
                    raise ConfigError(f"{key}[{i}]", f"a per-head list needs one entry per head ({num_heads}), "
                                                     f"got {len(v)}")
                v = tuple(v)
            out.append(v)
        return out
    return [value] * num_layers


PATTERN_KEYS = ("dilation", "window", "sinks", "topk_blocks", "block_size", "block_score")
"""The pattern's fields in the order of a head pattern's entries (D, W, P, K, S, score)."""


def pattern_fields(head_pattern: tuple) -> dict:
    """The fields (of ``PatternConfig`` or the HF config) that give every head of every layer ``head_pattern``
    ((D, W, P), or (D, W, P, K, S[, score]) with top-k): top-k is turned off by a plain (D, W, P)."""
    return {"topk_blocks": 0, **dict(zip(PATTERN_KEYS, head_pattern))}


def _entries(values: PerLayerHead, name: str):
    """``(key, value)`` of every int in a per-layer, per-head value, the key naming its place."""
    if not isinstance(values, list):
        yield name, values
        return
    for i, v in enumerate(values):
        if isinstance(v, list):
            for j, x in enumerate(v):
                yield f"{name}[{i}][{j}]", x
        else:
            yield f"{name}[{i}]", v


@dataclass(kw_only=True)
class PatternConfig:
    """The sparse attention pattern (D, W, P) of docs/spec.md §1.3, and top-k block attention (§4.5).

    Each of ``dilation``, ``window``, ``sinks`` and ``topk_blocks`` is an int, or one entry per layer whose
    entries are an int or one int per head (§4.4), e.g. ``dilation: [[1, 1, 16, 16], 64]``. A query at q sees keys
    k <= q with q - k <= W (window, inclusive), or k < P (sinks), or (k + 1) % D == 0 (grid). D = 1 is
    dense; D = -1 has no grid (window and sinks only). With ``topk_blocks`` K >= 2 the query also sees its own
    block of ``block_size`` keys, the first block and the K - 2 earlier blocks whose pooled keys score
    highest against it.
    """

    dilation: PerLayerHead = 1
    """D: grid stride, >= 1, or -1 for no grid."""
    window: PerLayerHead = 0
    """W: local window; a query sees itself and the W tokens before it."""
    sinks: PerLayerHead = 0
    """P: the first P positions are visible to every query."""
    topk_blocks: PerLayerHead = 0
    """K: blocks each query attends to under top-k block attention (first, own and K - 2 best); 0 = off."""
    block_size: int = 64
    """S: keys per block of top-k block attention."""
    block_score: Literal["max", "mean"] = "max"
    """How a block's keys are pooled (per channel) into the summary a query scores blocks with."""

    def __post_init__(self):
        for name in ("dilation", "window", "sinks", "topk_blocks"):
            for key, v in _entries(getattr(self, name), name):
                if name == "dilation" and not (v >= 1 or v == -1):
                    raise ConfigError(key, f"dilation must be >= 1 or -1 (no grid), got {v}")
                if name in ("window", "sinks") and v < 0:
                    raise ConfigError(key, f"{name} must be >= 0, got {v}")
                if name == "topk_blocks" and (v < 0 or v == 1):
                    raise ConfigError(key, f"topk_blocks must be 0 (off) or >= 2 (the first and the own block "
                                           f"count), got {v}")
        if self.block_size < 1:
            raise ConfigError("block_size", f"must be >= 1, got {self.block_size}")

    def per_layer(self, num_layers: int, num_heads: int | None = None) -> list[tuple]:
        """Each layer's pattern: ``(D, W, P)``, ``(D, W, P, K, S, score)`` with top-k, or where the heads of a
        layer differ a tuple of one such head pattern per head (``ratplus_mega/hf/cache_layout.py``). Raises
        if a list has the wrong length (per-head lists are checked when ``num_heads`` is given)."""
        columns = [_per_layer(name, getattr(self, name), num_layers, num_heads)
                   for name in ("dilation", "window", "sinks", "topk_blocks")]
        out = []
        for i, entries in enumerate(zip(*columns)):
            lengths = {len(e) for e in entries if isinstance(e, tuple)}
            if len(lengths) > 1:
                raise ConfigError(f"dilation[{i}]", f"the per-head lists of layer {i} differ in length "
                                                    f"({sorted(lengths)})")
            heads = lengths.pop() if lengths else 1
            per_head = [e if isinstance(e, tuple) else (e,) * heads for e in entries]
            patterns = [(d, w, p, k, self.block_size, self.block_score) if k and d != 1 else (d, w, p)
                        for d, w, p, k in zip(*per_head)]
            out.append(patterns[0] if len(set(patterns)) == 1 else tuple(patterns))
        return out

    @property
    def is_dense(self) -> bool:
        return all(v == 1 for _, v in _entries(self.dilation, "dilation"))

    def uses_topk(self, num_layers: int, num_heads: int) -> bool:
        """Whether some head of some layer runs top-k block attention."""
        layers = self.per_layer(num_layers, num_heads)
        return any(len(head) > 3 for layer in layers for head in (layer if isinstance(layer[0], tuple) else [layer]))


def _head_name(p: tuple) -> str:
    if p[0] == 1:
        return "dense"
    name = f"D{p[0]}-W{p[1]}-P{p[2]}"
    return name + (f"-top{p[3]}x{p[4]}" + ("mean" if p[5] == "mean" else "") if len(p) > 3 else "")


def _layer_name(p: tuple) -> str:
    if not (p and isinstance(p[0], tuple)):
        return _head_name(p)
    runs: list[list] = []  # run-length: [name, count]
    for head in p:
        name = _head_name(head)
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return "heads:" + "+".join(f"{n}x{name}" if n > 1 else name for name, n in runs)


def pattern_name(patterns: list[tuple]) -> str:
    """'dense', 'D16-W256-P4', 'D-1-W0-P4-top16x64' (top-k: K blocks of S), 'heads:2xdense+2xD16-W0-P4' (heads
    in order, runs counted), or for layers that differ 'per-layer:' and each layer's name, comma-separated.
    The one spelling of a pattern in logs, metrics, tables and file names."""
    names = [_layer_name(p) for p in patterns]
    return names[0] if len(set(names)) == 1 else "per-layer:" + ",".join(names)


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a RAT+ language model (docs/spec.md §1, §6)."""

    preset: str | None = None
    """Name of a file in configs/model/ (or a path) whose ``model`` section these fields override."""
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    head_dim: int = 128
    ffn_hidden_size: int | None = None
    """GELU FFN width; defaults to 4 * hidden_size."""
    seq_len: int = 4096
    """Training window and the longest position the model is built for."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    apply_recurrence: bool = True
    """False builds the gated-attention baseline (no forget gate, no scan)."""
    eos_token_id: int = 2
    pattern: PatternConfig = field(default_factory=PatternConfig)
    """The configured sparse pattern ('sparse' attention mode)."""

    def __post_init__(self):
        if isinstance(self.pattern, dict):
            self.pattern = PatternConfig(**self.pattern)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.head_dim:
            raise ConfigError(
                "hidden_size",
                f"must be divisible by head_dim ({self.head_dim}), got {self.hidden_size}",
            )
        if self.num_heads * self.head_dim != self.hidden_size:
            raise ConfigError(
                "num_heads",
                f"num_heads * head_dim must equal hidden_size: {self.num_heads} * {self.head_dim} "
                f"!= {self.hidden_size} (use num_heads={self.hidden_size // self.head_dim})",
            )
        if self.head_dim % 2:
            raise ConfigError("head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        elif self.ffn_hidden_size < 1:
            raise ConfigError("ffn_hidden_size", f"must be >= 1, got {self.ffn_hidden_size}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ConfigError("eos_token_id", f"must be a token id below vocab_size, got {self.eos_token_id}")
        try:
            self.layer_patterns()
        except ConfigError as e:
            raise ConfigError(f"pattern.{e.key}", e.message) from None

    def layer_patterns(self) -> list[tuple]:
        """The configured pattern of each layer (``PatternConfig.per_layer``)."""
        return self.pattern.per_layer(self.num_layers, self.num_heads)

    @property
    def fused_slices(self) -> int:
        """Slices of the fused input projection: o, q, k, v and, with the recurrence, the gate g (spec §1.2)."""
        return 5 if self.apply_recurrence else 4


@dataclass(kw_only=True)
class ParallelConfig:
    """How a run is laid out over ranks (docs/parallelism.md); data parallel is what is left."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    context_parallel_order: Literal["zigzag", "contiguous"] = "zigzag"
    """zigzag: CP rank r holds chunks r and 2·CP − 1 − r of 2·CP (the causal dense pass costs every rank the
    same); contiguous: chunk r of CP."""
    sequence_parallel: bool = False
    """Megatron sequence parallel inside each tensor-parallel group."""
    zero_stage: int = 1
    zero_overlap_comm: bool = True
    """ZeRO-1/2: reduce gradient buckets while backward still runs (DeepSpeed's ``overlap_comm``). Pipeline-parallel
    runs go without: DeepSpeed overlaps there only at ZeRO-2, and they run ZeRO-1."""
    zero_contiguous_gradients: bool = True
    """ZeRO-2: copy gradients into one contiguous buffer as they are produced (less fragmentation)."""
    zero_bucket_elements: int = 500_000_000
    """Elements per gradient reduce bucket and per parameter all-gather bucket (DeepSpeed's
    ``reduce_bucket_size`` / ``allgather_bucket_size``): larger buckets, fewer and more efficient collectives,
    more memory held (2 bytes x bucket in bf16, 4 in fp32)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: the GPUs when present, else the CPU; cuda: a rank without a GPU stops at start (what a cluster job
    wants: launch/train_slurm.sbatch sets it); cpu: the GPUs are hidden."""

    def __post_init__(self):
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_bucket_elements < 1:
            raise ConfigError("zero_bucket_elements", f"must be >= 1, got {self.zero_bucket_elements}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError("sequence_parallel", "needs tensor_parallel > 1")
        if self.zero_stage == 3 and (self.tensor_parallel, self.pipeline_parallel, self.context_parallel) != (1, 1, 1):
            raise ConfigError("zero_stage", "ZeRO-3 is supported only with tensor, pipeline and context parallel all 1")
        if self.pipeline_parallel > 1 and self.zero_stage != 1:
            raise ConfigError("zero_stage", "pipeline parallel runs with ZeRO-1 (DeepSpeed's ZeRO-0 clipping counts "
                              "the tied embedding twice; ZeRO-2 under megatron-core's schedule is not verified)")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel


@dataclass(kw_only=True)
class DataConfig:
    """Where tokens come from (MDS datasets written by ``ratplus prep shards``)."""

    train: list[str] = field(default_factory=list)
    """MDS dataset folders (local paths or remote URLs) to train on."""
    train_weights: list[float] | None = None
    """Mixture weights, one per ``train`` entry; None samples in proportion to size."""
    val: str | None = None
    """MDS folder read exactly (no streaming padding) for validation."""
    tokenizer: str | None = None
    """The sentencepiece ``.model`` the shards were written with."""
    sampler: Literal["ordered", "random_offset"] = "ordered"
    """'ordered': shuffled fixed windows (pretraining); 'random_offset': windows at random offsets (adaptation)."""
    shuffle_seed: int = 1005
    """Seed of the streaming shuffle; with 'random_offset' the sampler of DP rank r is seeded shuffle_seed + r
    (the reference adapts with seed 0 + rank, spec §3)."""
    shuffle_algo: Literal["py1e", "py1br", "py1b", "py1s", "py2s", "naive"] = "py1e"
    """Streaming's shuffle algorithm; pinned and stored in the loader state with the seed."""
    num_canonical_nodes: int = 1
    """Pinned so the sample order does not depend on the first run's node count."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 reads in the training process)."""
    cache_dir: str | None = None
    """Local folder where remote (s3://, gs://, ...) datasets are cached; needed when a train/val entry is remote."""

    def __post_init__(self):
        if self.train_weights is not None:
            if len(self.train_weights) != len(self.train):
                raise ConfigError(
                    "train_weights",
                    f"needs one weight per train entry ({len(self.train)}), got {len(self.train_weights)}",
                )
            if any(w <= 0 for w in self.train_weights):
                raise ConfigError("train_weights", "weights must be > 0")
        if self.num_canonical_nodes < 1:
            raise ConfigError("num_canonical_nodes", f"must be >= 1, got {self.num_canonical_nodes}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.shuffle_seed < 0:
            raise ConfigError("shuffle_seed",
                              f"must be >= 0 (streaming refuses negative seeds), got {self.shuffle_seed}")
        remote = [p for p in [*self.train, *([self.val] if self.val else [])] if "://" in p]
        if remote and not self.cache_dir:
            raise ConfigError("cache_dir", f"remote datasets ({remote[0]}) need a local cache_dir")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation, schedule and bookkeeping of one training phase (docs/spec.md §2–§3)."""

    phase: Literal["pretrain", "adapt"] = "pretrain"
    joint: bool = False
    """Active recurrence learning (spec §2.2): per global batch a step under the model's configured
    pattern, then a dense step on the same micro-batches."""
    init_from: str | None = None
    """Adaptation: a training checkpoint or HF folder to take the weights from."""
    micro_batch_size: int = 1
    global_batch_size: int = 512
    train_tokens: int = 110_000_000_000
    """Token budget; the number of steps is train_tokens // (global_batch_size * seq_len)."""
    lr: float = 8e-4
    min_lr: float = 1e-6
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    decay_all_parameters: bool = True
    """Weight decay on norms and embedding too, as the reference does (spec §8.17)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16: bf16 weights and activations with fp32 master weights, optimizer state and gradient accumulation
    (DeepSpeed's bf16 mode; needs ZeRO 1-3); fp32: everything fp32 (CPU runs)."""
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """The dtype gradients are reduced over data-parallel ranks in under bf16 (DeepSpeed's
    ``communication_data_type``): fp32 keeps the fp32 accumulation's precision through the reduction, bf16
    halves its bytes (docs/decisions.md, "bf16")."""
    residual_dtype: Literal["fp32", "bf16"] = "fp32"
    """The residual stream's dtype under bf16: fp32 as the reference's autocast keeps it (the mixer's and FFN's
    bf16 outputs are added in fp32, the norms hand bf16 to the matmuls), bf16 halves its activation memory and
    the bytes pipeline stages send (docs/decisions.md, "bf16")."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activations recomputed in backward instead of stored: none; selective, the mixer's core (recurrence,
    RoPE and attention: the fp32 scan state and attention statistics, a small share of the FLOPs); full, every
    block (only its input is stored)."""
    loss_chunk_tokens: int = 0
    """The output layer and loss run over chunks of this many positions of a micro-batch's sequence, each
    chunk's logits recomputed in backward, so the fp32 logits (micro-batch x seq x vocab) are never held whole;
    0: all at once."""
    compile_glue: bool = False
    """``torch.compile`` the elementwise glue between the matmuls and kernels (RMSNorm, RoPE, the output gate):
    fewer memory passes on a GPU; off until measured there."""
    seed: int = 1005
    log_interval: int = 10
    eval_interval: int = 1000
    eval_tokens: int = -1
    """Validation tokens per evaluation; -1 reads the whole validation set."""
    eval_patterns: list[PatternConfig] = field(default_factory=list)
    """Sparse patterns validated besides dense attention (the configured one is always included)."""
    save_interval: int = 1000
    keep_last: int = 3
    """Committed checkpoints kept; only those this run wrote are ever pruned (docs/checkpoints.md)."""
    out_dir: str = "runs/default"
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the newest checkpoint in ``out_dir/checkpoints`` that verifies, else start afresh;
    never: start afresh, refused where ``out_dir`` holds committed checkpoints unless ``overwrite`` is set."""
    overwrite: bool = False
    """With ``resume: never``, start afresh in an ``out_dir`` that holds checkpoints: they (with the old run's
    config.yaml, metrics.jsonl and tensorboard/) move to ``out_dir/checkpoints.replaced-<time>/``; nothing is
    deleted."""

    def __post_init__(self):
        self.eval_patterns = [PatternConfig(**p) if isinstance(p, dict) else p for p in self.eval_patterns]
        if self.loss_chunk_tokens < 0:
            raise ConfigError("loss_chunk_tokens", f"must be >= 0 (0: no chunks), got {self.loss_chunk_tokens}")
        for name in ("micro_batch_size", "global_batch_size", "train_tokens", "log_interval", "eval_interval",
                     "save_interval", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("min_lr", f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError("warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError("adam_betas", f"must be two numbers in [0, 1), got {self.adam_betas}")
        if self.grad_clip <= 0:
            raise ConfigError("grad_clip", f"must be > 0, got {self.grad_clip}")
        if self.overwrite and self.resume != "never":
            raise ConfigError("overwrite", "applies only with train.resume=never (with resume=auto the run continues "
                                           "the checkpoints in train.out_dir instead of replacing them)")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                "global_batch_size",
                f"must be a multiple of micro_batch_size ({self.micro_batch_size}), got {self.global_batch_size}",
            )


@dataclass(kw_only=True)
class RunConfig:
    """A whole run: the sections above, checked together by :meth:`validate`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        m, p, t = self.model, self.parallel, self.train
        if m.num_heads % p.tensor_parallel:
            raise ConfigError("parallel.tensor_parallel",
                              f"must divide num_heads ({m.num_heads}), got {p.tensor_parallel}")
        if m.num_layers % p.pipeline_parallel:
            raise ConfigError(
                "parallel.pipeline_parallel", f"must divide num_layers ({m.num_layers}), got {p.pipeline_parallel}"
            )
        if p.context_parallel > 1:
            chunks = p.context_parallel * (2 if p.context_parallel_order == "zigzag" else 1)
            pieces = chunks * (p.tensor_parallel if p.sequence_parallel else 1)
            if m.seq_len % pieces:
                what = f"{chunks} {p.context_parallel_order} chunks" + (
                    f", each split over {p.tensor_parallel} sequence-parallel ranks" if p.sequence_parallel else "")
                raise ConfigError("parallel.context_parallel",
                                  f"model.seq_len ({m.seq_len}) does not split into {what}")
            for key, pattern in [("model.pattern", m.pattern)] + [
                    (f"train.eval_patterns[{i}]", e) for i, e in enumerate(t.eval_patterns)]:
                if pattern.uses_topk(m.num_layers, m.num_heads):
                    raise ConfigError(f"{key}.topk_blocks", "top-k block attention runs on whole sequences: train, "
                                      "adapt or validate it with parallel.context_parallel 1")
        if t.precision == "bf16" and p.zero_stage == 0:
            raise ConfigError("parallel.zero_stage", "train.precision=bf16 needs ZeRO stage 1, 2 or 3: DeepSpeed has "
                              "no ZeRO-0 path for bf16 weights with fp32 gradient accumulation")
        for key in ("grad_reduce_dtype", "residual_dtype"):
            if t.precision == "fp32" and getattr(t, key) != "fp32":
                raise ConfigError(f"train.{key}", "bf16 applies to train.precision=bf16 runs only")
        if t.joint and m.pattern.is_dense:
            raise ConfigError("train.joint", "joint training needs a sparse model.pattern (e.g. dilation: 64)")
        for i, pattern in enumerate(t.eval_patterns):
            key = f"train.eval_patterns[{i}]"
            try:
                pattern.per_layer(m.num_layers, m.num_heads)
            except ConfigError as e:
                raise ConfigError(f"{key}.{e.key}", e.message) from None
        return self

"""Shared test setup: the reference model never runs fused kernels, nothing reaches a network hub.

Helpers used by several test files are fixtures here (tests are imported with ``--import-mode=importlib``, so
this file is not importable as a module).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

# Set before anything imports the reference model or transformers: the oracle must be pure torch, and a
# test must never try to download a tokenizer or model.
os.environ["RATPLUS_DISABLE_KERNELS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton picks interpreter or compiler when a kernel is defined: decide before any test file imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _loop_scan(gate: torch.Tensor, x: torch.Tensor, initial_state: torch.Tensor | None):
    """h_t = gate_t * h_{t-1} + (1 - gate_t) * x_t, one step at a time in fp64 (the oracle); gate broadcasts
    against x. Returns h (..., T, C) and the final state (..., C), both fp64."""
    gate, x = torch.broadcast_tensors(gate.double(), x.double())
    h = torch.zeros_like(x[..., 0, :]) if initial_state is None else initial_state.double().expand_as(x[..., 0, :])
    out = []
    for t in range(x.shape[-2]):
        h = gate[..., t, :] * h + (1 - gate[..., t, :]) * x[..., t, :]
        out.append(h)
    return torch.stack(out, dim=-2), h


def _shift(t: torch.Tensor, n: int, fill: float) -> torch.Tensor:
    """``t`` moved ``n`` steps later along time (dim -2), the first ``n`` steps set to ``fill``."""
    return torch.cat([torch.full_like(t[..., :n, :], fill), t[..., :-n, :]], dim=-2)


def _plain_scan(gate: torch.Tensor, x: torch.Tensor, initial_state: torch.Tensor | None = None):
    """The recurrence as plain torch computes it in the inputs' own precision: the reference's prefix scan
    (pairs (a, b), log2(T) combining steps), products of gates kept in the gate's dtype and every partial sum
    stored in ``x``'s dtype, nothing upcast. On bf16 inputs it is the bf16 baseline of the tolerance rule
    (``compare_to_baseline``); on float64 inputs it is exact (the oracle). Returns h (..., T, C) and the final
    state, both in ``x``'s dtype."""
    a, b = gate, ((1 - gate) * x).to(x.dtype)
    step = 1
    while step < b.shape[-2]:
        b = (b + a * _shift(b, step, 0.0)).to(x.dtype)
        a = a * _shift(a, step, 1.0)
        step *= 2
    if initial_state is not None:
        b = (b + a * initial_state.unsqueeze(-2)).to(x.dtype)
    return b, b[..., -1, :]


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dilation: int, window: int, sinks: int,
                      *, q_offset: int = 0, k_positions: torch.Tensor | None = None, scale: float | None = None):
    """Softmax attention of queries at ``q_offset``.. over keys at 0.. (or at ``k_positions``) under the pattern's
    explicit boolean mask (k <= q and (q - k <= W or k < P or (k + 1) % D == 0; no grid term for D = -1)),
    computed in ``q``'s dtype throughout (scores, softmax, the product with v; nothing upcast): torch's own bf16
    baseline on bf16 inputs, the oracle on float64 ones. A row with no allowed key gives 0 and an LSE of -inf.
    Returns (out, lse)."""
    q_pos = torch.arange(q_offset, q_offset + q.shape[-2], device=q.device)[:, None]
    k_pos = (torch.arange(k.shape[-2], device=q.device) if k_positions is None else k_positions.to(q.device))[None]
    near = (q_pos - k_pos <= window) | (k_pos < sinks)
    if dilation != -1:
        near = near | ((k_pos + 1) % dilation == 0)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~((k_pos <= q_pos) & near), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # torch's own softmax (its internal precision)
    return probs @ v, torch.logsumexp(scores, dim=-1)


def _tiny_config(**overrides):
    """A small :class:`RatPlusConfig` (2 layers, d 32, 2 heads of 16) for fast CPU tests."""
    from ratplus_mega.hf import RatPlusConfig

    kwargs = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                  max_position_embeddings=64)
    kwargs.update(overrides)
    return RatPlusConfig(**kwargs)


def _tiny_model(seed: int = 0, **overrides):
    """A fp32 :class:`RatPlusForCausalLM` on :func:`tiny_config` with N(0, 0.02) weights, RMSNorm gains
    randomised around 1 and the gate rows scaled up so that the forget gates spread over (0, 1) (at init they
    sit near 0.5 and a wrong recurrence would hide behind a short memory)."""
    from ratplus_mega.hf import RatPlusForCausalLM

    torch.manual_seed(seed)
    model = RatPlusForCausalLM(_tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("in_proj.weight"):
                p.normal_(0, 0.2)
                if model.config.apply_recurrence:
                    p[4 * model.config.hidden_size:] *= 3
            elif p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="session")
def assert_close():
    """``assert_close(name, got, ref, tol)``: ``compare`` of ``ratplus_mega.kernels.testing``, the project's one
    error metric (raises unless ``max|got - ref| <= tol * max(max|ref|, 1e-6)``). Tolerances: 1e-5 for fp32
    values and 1e-4 for fp32 gradients; bf16 ones derive from torch's own bf16 error (``compare_to_baseline``)."""
    return importlib.import_module("ratplus_mega.kernels.testing").compare


@pytest.fixture(scope="session")
def loop_scan():
    """``loop_scan(gate, x, initial_state) -> (h, final)``: the gated recurrence step by step in fp64."""
    return _loop_scan


@pytest.fixture(scope="session")
def plain_scan():
    """``plain_scan(gate, x, initial_state=None) -> (h, final)``: the recurrence in the inputs' own precision
    (bf16 baseline), or exact on float64 inputs (oracle)."""
    return _plain_scan


@pytest.fixture(scope="session")
def masked_attention():
    """``masked_attention(q, k, v, D, W, P, *, q_offset=0, k_positions=None, scale=None) -> (out, lse)``:
    explicit-mask attention in ``q``'s dtype (bf16 baseline), or exact on float64 inputs (oracle)."""
    return _masked_attention


@pytest.fixture(scope="session")
def tiny_config():
    """Factory ``tiny_config(**overrides) -> RatPlusConfig``."""
    return _tiny_config


@pytest.fixture(scope="session")
def tiny_model():
    """Factory ``tiny_model(seed=0, **config_overrides) -> RatPlusForCausalLM`` (fp32, eval mode)."""
    return _tiny_model


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread: tiny-tensor tests issue thousands of small ops, and with two OpenMP
    threads on a shared, busy CPU every op waits for a descheduled peer (seconds per test instead of ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def single_rank():
    """A one-process gloo group (and the environment DeepSpeed reads), for code that needs torch.distributed."""
    import socket

    import torch.distributed as dist

    from ratplus_mega.parallel.process_group import prepare_deepspeed_for_cpu

    prepare_deepspeed_for_cpu()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _fresh_kernels():
    fwd = sys.modules.get("ratplus_mega.kernels.scan.fwd")
    if fwd is not None and fwd.INTERPRET != (os.environ.get("TRITON_INTERPRET") == "1"):
        for name in [n for n in sys.modules if n == "ratplus_mega.kernels" or n.startswith("ratplus_mega.kernels.")]:
            del sys.modules[name]
    return importlib.import_module("ratplus_mega.kernels")


@pytest.fixture(scope="session")
def kernels():
    """The ``ratplus_mega.kernels`` module, imported after the interpreter switch (re-imported if a test file
    imported it earlier under the other Triton mode). Used by tests/kernels/ and tests/benchmarks/."""
    return _fresh_kernels()


@pytest.fixture(scope="session")
def device() -> str:
    """``"cuda"`` where a GPU is visible, else ``"cpu"`` (the kernels then run under the Triton interpreter)."""
    return DEVICE


_CLI_DRIVER = """
import json, sys
blocked = set(sys.argv[1].split(",")) - {""}

class Unimportable:  # a finder that makes the blocked packages fail to import, as if not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is made unimportable by the test")

sys.meta_path.insert(0, Unimportable())
from ratplus_mega.cli import main
code = main(sys.argv[2:])
print(json.dumps({"code": code, "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"megatron", "deepspeed"})}))
"""


@pytest.fixture
def cli_imports():
    """``cli_imports(args, block=(...))`` runs ``ratplus ARGS`` in a fresh interpreter with the ``block``ed
    packages unimportable; returns (exit code, the heavy training packages it loaded, stderr)."""
    def run(args: list[str], *, block: tuple[str, ...] = ()):
        proc = subprocess.run([sys.executable, "-c", _CLI_DRIVER, ",".join(block), *map(str, args)],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        return result["code"], result["loaded"], proc.stderr
    return run


# ------------------------------------------------------------------------------------------------------------
# A small synthetic corpus, its tokenizer and MDS shards at the tiny preset's seq_len (128), shared by the
# end-to-end training tests and the reliability tests (built once per session).
# ------------------------------------------------------------------------------------------------------------

WORDS = ("the a one every small large red blue river stone bird cloud city road tree light song "
         "runs sees keeps holds finds makes opens near under over after before quickly slowly").split()


def write_corpus(path, documents: int, seed: int = 0) -> None:
    import random

    rng = random.Random(seed)
    lines = []
    for d in range(documents):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 6))]
        lines.append(f'{{"text": "Document {d}. {" ".join(sentences)}"}}')
    path.write_text("\n".join(lines) + "\n")


def _prepare(root, corpus, documents_per_line: bool, tokenizer_corpus=None):
    from ratplus_mega.data_prep.to_mds import PrepOptions, prep_shards
    from ratplus_mega.data_prep.train_tokenizer import TokenizerOptions, train_tokenizer

    tokenizer = train_tokenizer(TokenizerOptions(inputs=[str(tokenizer_corpus or corpus)], vocab_size=512,
                                                 out=str(root / "tok.model"), model_type="bpe", text_field="text",
                                                 txt_blocks=False))
    prep_shards(PrepOptions(inputs=[str(corpus)], tokenizer=str(tokenizer), out=str(root / "shards"), seq_len=128,
                            text_field="text", val_fraction=0.05 if documents_per_line else 0.0, seed=0, workers=1,
                            strict=False, txt_blocks=False))
    return root / "shards"


@pytest.fixture(scope="session")
def single_document_shards(tmp_path_factory):
    """One long document: every window but the last has 128 predicted tokens (no EOS inside), so the
    recipe's mean of micro-batch token means does not depend on how samples group into micro-batches."""
    root = tmp_path_factory.mktemp("one-doc")
    corpus = root / "corpus.txt"
    write_corpus(root / "lines.jsonl", 600, seed=1)
    corpus.write_text(" ".join(line[10:-2] for line in (root / "lines.jsonl").read_text().splitlines()))
    return _prepare(root, corpus, documents_per_line=False, tokenizer_corpus=root / "lines.jsonl")


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """``prep tokenizer`` (vocab 512, the tiny preset's) and ``prep shards`` at seq_len 128; returns the folder."""
    root = tmp_path_factory.mktemp("tiny-data")
    corpus = root / "corpus.jsonl"
    write_corpus(corpus, 1500)
    return _prepare(root, corpus, documents_per_line=True)

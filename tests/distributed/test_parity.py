"""Launch the multi-rank parity checks (one torchrun per layout; every assertion runs inside the ranks)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.runs import free_port

WORKER = Path(__file__).with_name("parity_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _launch(layout: str, nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RATPLUS_DISABLE_KERNELS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), str(WORKER), layout]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line or "rank" in line]
        pytest.fail(f"{layout} failed (exit {proc.returncode}):\n" + "\n".join(errors[-30:]))
    assert f"{layout}: parity checks passed" in proc.stdout


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["tp2", "tp2-sp"])
def test_tensor_parallel_matches_reference(layout):
    """Logits, loss and every gradient, dense and sparse; peers get bitwise-equal broadcast batches;
    layout-free init equals the reference init bitwise. Then 3 clipped bf16 steps (ZeRO-1) through the run's
    step runner: losses and gradient norms within the bf16 tolerance of the fp32 reference."""
    _launch(layout, 2)


@pytest.mark.multiproc
def test_tensor_parallel_with_per_head_patterns_matches_reference():
    """TP=2 with per-head patterns, top-k heads among them (each rank runs its own heads' patterns): logits,
    loss and every gradient, dense and sparse."""
    _launch("tp2-heads", 2)


@pytest.mark.multiproc
def test_zero_data_parallel_matches_one_process():
    """2 DP ranks under DeepSpeed ZeRO-2: losses, gradient norms and weights after 3 AdamW steps. Then bf16 at
    ZeRO-1 and ZeRO-2: losses and gradient norms of 3 clipped steps within the bf16 tolerance."""
    _launch("dp2-zero2", 2)


@pytest.mark.multiproc
@pytest.mark.slow
def test_tp2_pp2_zero1_pipeline_matches_one_process():
    """TP=2 x PP=2 (4 ranks), megatron-core 1F1B on engine.module, DeepSpeed ZeRO-1 steps: gradients, losses,
    gradient norms and weights after 3 steps; the tied embedding copies stay bitwise equal. Then bf16: losses
    and gradient norms of 3 clipped steps within the bf16 tolerance, micro-batches accumulated in fp32, the
    tied copies bitwise equal after every step."""
    _launch("tp2-pp2-zero1", 4)


@pytest.mark.multiproc
@pytest.mark.parametrize("layout,nproc", [("cp2", 2), ("cp4", 4)])
def test_context_parallel_matches_reference(layout, nproc):
    """CP = 2 and 4 against the one-process reference on a 48-token sequence, zigzag and contiguous chunks,
    sparse and dense passes, for dense, D=4, D=4 W=5 P=2 (windows across chunk boundaries), D=5 (dividing no
    chunk length), D=-1 and a per-layer/per-head hybrid: logits 1e-5, loss 1e-5, every gradient 1e-4 (summed
    over the CP ranks, as DeepSpeed reduces them)."""
    _launch(layout, nproc)


@pytest.mark.multiproc
def test_context_parallel_with_tensor_parallel_matches_reference():
    """CP = 2 x TP = 2 with sequence parallel: the checks above, then 3 clipped fp32 steps at ZeRO-1 through the
    run's step runner and engine equal one process."""
    _launch("cp2-tp2", 4)


@pytest.mark.multiproc
def test_context_parallel_with_data_parallel_zero_matches_one_process():
    """CP = 2 x DP = 2: 3 clipped fp32 steps at ZeRO-0, 1 and 2 through the run's step runner and engine
    (gradients summed over CP, averaged over DP, ZeRO partitioned over DP x CP): losses and gradient norms (ZeRO-0
    reports none) equal one process stepping on the whole batch. Then bf16 at ZeRO-2: within the bf16
    tolerance."""
    _launch("cp2-dp2", 4)


@pytest.mark.multiproc
def test_context_parallel_with_pipeline_parallel_matches_one_process():
    """CP = 2 x PP = 2 at ZeRO-1 under megatron-core's schedule (which scales the loss by the CP size for its
    own convention; the stage hands it back): 3 clipped fp32 steps equal one process."""
    _launch("cp2-pp2", 4)

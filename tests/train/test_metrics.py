"""Metrics as data: the throughput meter counts every step it times, and metrics.jsonl holds each step once."""

import json

import pytest

from ratplus_mega.train.metrics import METRICS_FILE, MetricsLog, Throughput, read_metrics


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_tokens_per_second_times_elapsed_is_the_tokens_processed():
    clock = FakeClock()
    meter = Throughput(tokens_per_step=4096, flops_per_token=6e9, world_size=8, peak_tflops=989.0, total_steps=100,
                       start_step=20, clock=clock)
    clock.now += 12.5  # ten steps of 1.25 s, logged together (log_interval = 10)
    stats = meter.measure(30)
    assert stats["perf/tokens_per_s"] * 12.5 == pytest.approx(10 * 4096)
    assert stats["perf/step_time_s"] == pytest.approx(1.25)
    assert stats["perf/eta_s"] == pytest.approx(70 * 1.25)
    assert stats["perf/mfu"] == pytest.approx(10 * 4096 / 12.5 * 6e9 / (8 * 989e12))
    clock.now += 30.0  # validation and a save: not training time
    meter.restart(30)
    clock.now += 2.0
    assert meter.measure(31)["perf/tokens_per_s"] == pytest.approx(4096 / 2.0)


def _train_record(step):
    return {"kind": "train", "step": step, "tokens": step * 64, "train/lr": 1e-3, "train/loss_D8-W0-P0": 3.0 - step,
            "train/grad_norm_D8-W0-P0": 1.0, "perf/tokens_per_s": 10.0, "perf/eta_s": 1.0}


def test_records_reach_the_file_tensorboard_and_the_console(tmp_path, capsys):
    log = MetricsLog(tmp_path, resume_step=0, total_steps=4)
    log.write(_train_record(1))
    log.write({"kind": "val", "step": 1, "tokens": 64, "val/loss_dense": 2.5, "val/ppl_dense": 12.18,
               "val/tokens_dense": 640})
    log.close()
    assert [r["kind"] for r in read_metrics(tmp_path)] == ["train", "val"]
    assert read_metrics(tmp_path, "val")[0]["val/loss_dense"] == 2.5
    out = capsys.readouterr().out
    assert "step 1/4 loss D8-W0-P0 2.0000" in out and "validation step 1 [dense] loss 2.5000" in out
    assert list((tmp_path / "tensorboard").iterdir())


def test_checkpoint_records_are_read_back_and_printed(tmp_path, capsys):
    log = MetricsLog(tmp_path, resume_step=0, total_steps=4)
    log.write(_train_record(2))
    log.write({"kind": "checkpoint", "step": 2, "tokens": 128, "ckpt/save_s": 2.0, "ckpt/bytes": 3_000_000_000})
    log.close()
    assert read_metrics(tmp_path, "checkpoint") == [{"kind": "checkpoint", "step": 2, "tokens": 128,
                                                     "ckpt/save_s": 2.0, "ckpt/bytes": 3_000_000_000}]
    assert "checkpoint step 2: 3.000 GB in 2.0 s (1.50 GB/s)" in capsys.readouterr().out


def test_a_resumed_run_drops_the_records_past_its_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, resume_step=0, total_steps=8)
    for step in range(1, 6):
        log.write(_train_record(step))
    log.close()
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write(json.dumps(_train_record(6))[:20])  # killed while writing step 6
    log = MetricsLog(tmp_path, resume_step=4, total_steps=8)  # the newest checkpoint was step 4
    for step in range(5, 9):
        log.write(_train_record(step))
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLog(None, resume_step=0, total_steps=8)
    log.write(_train_record(1))
    log.close()
    assert not (tmp_path / METRICS_FILE).exists()

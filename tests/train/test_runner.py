"""The step runner hands every batch to the model on the model's device (DeepSpeed moves the model, never
the inputs), checked without a GPU: the context names the meta device and a stand-in engine records where
its inputs live."""

from types import SimpleNamespace

import torch

from ratplus_mega.train.runner import EngineRunner


class RecordingEngine:
    def __init__(self):
        self.devices = []

    def __call__(self, input_ids, labels, attention_mode="sparse"):
        self.devices += [input_ids.device, labels.device]
        return torch.zeros((), device=input_ids.device, requires_grad=True)

    def backward(self, loss):
        pass

    def step(self):
        pass


def _cpu_batches(n):
    return [{"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 8, dtype=torch.long)}
            for _ in range(n)]


def test_training_batches_reach_the_model_on_its_device():
    ctx = SimpleNamespace(device=torch.device("meta"), dp=1)
    engine = RecordingEngine()
    EngineRunner(ctx).train_pass(engine, _cpu_batches(3), "sparse")
    assert engine.devices and all(d.type == "meta" for d in engine.devices), engine.devices


def test_validation_batches_reach_the_model_on_its_device():
    ctx = SimpleNamespace(device=torch.device("meta"), dp=1)
    model = RecordingEngine()
    for batch in _cpu_batches(2):
        EngineRunner(ctx).eval_loss(model, batch)
    assert model.devices and all(d.type == "meta" for d in model.devices), model.devices


def test_pipeline_stages_send_the_residual_stream_in_its_dtype():
    """megatron-core's schedule allocates what a stage receives in ``config.pipeline_dtype``: it must be the
    dtype the previous stage hands on (fp32 made bf16 stages fail on "m1 and m2 to have the same dtype")."""
    from ratplus_mega.train.runner import PipelineRunner

    runner = PipelineRunner.__new__(PipelineRunner)  # its data feed needs process groups; prepare does not
    runner.bf16 = True
    for dtype in (torch.float32, torch.bfloat16):
        stage = SimpleNamespace(residual_dtype=dtype, config=SimpleNamespace(pipeline_dtype=None),
                                post_process=False, pre_process=True)
        runner.prepare(stage)
        assert stage.config.pipeline_dtype == dtype

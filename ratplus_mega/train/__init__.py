"""The training driver: DeepSpeed engine set-up, joint (sparse + dense) steps, schedule, loop, metrics."""

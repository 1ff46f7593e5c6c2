"""The residual stream under bf16 weights (what DeepSpeed's bf16 mode makes of the module): fp32 by default, as
the reference keeps it under autocast, with the norms handing bf16 to the matmuls; bf16 when configured
(docs/decisions.md, "bf16")."""

import torch

from ratplus_mega.config import load_config
from ratplus_mega.model import build_model
from ratplus_mega.parallel import ParallelContext


def _dtypes(model, tokens):
    """(block input, mixer input, block output) dtypes of every layer in one forward and backward."""
    seen = []
    hooks = []
    for block in model.layers.values():
        hooks.append(block.register_forward_hook(lambda mod, args, out: seen.append(("block", args[0].dtype,
                                                                                      out.dtype))))
        hooks.append(block.mixer.register_forward_pre_hook(lambda mod, args: seen.append(("mixer", args[0].dtype))))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    for hook in hooks:
        hook.remove()
    return seen


def test_the_residual_stream_keeps_its_dtype_under_bf16_weights(single_rank):
    cfg = load_config("configs/model/tiny.yaml", ["model.pattern.dilation=4"])
    ctx = ParallelContext.initialize(cfg.parallel)
    model = build_model(cfg.model, ctx, seed=0).bfloat16()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    seen = _dtypes(model, tokens)
    assert [s for s in seen if s[0] == "block"] == [("block", torch.float32, torch.float32)] * 2, seen
    assert [s for s in seen if s[0] == "mixer"] == [("mixer", torch.bfloat16)] * 2, seen
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())

    model.residual_dtype = torch.bfloat16  # train.residual_dtype: bf16
    seen = _dtypes(model, tokens)
    assert all(dtype == torch.bfloat16 for s in seen for dtype in s[1:]), seen

"""Patterns ``ratplus eval`` runs a folder under: whole-model patterns, per-head groups, top-k, the folder's own."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from ratplus_mega.errors import RatplusError
from ratplus_mega.evaluation.models import HeadGroups, open_model, parse_patterns


def test_patterns_parse():
    assert parse_patterns("dense, 8:16:4 ,own") == [(1, 0, 0), (8, 16, 4), None]
    assert parse_patterns("dense/8:0:0") == [HeadGroups(((1, 0, 0), (8, 0, 0)))]
    assert parse_patterns("-1:0:4:4:8") == [(-1, 0, 4, 4, 8, "max")]
    for bad in ("8:16", "dense/8", "x", ","):
        with pytest.raises(RatplusError, match="--patterns"):
            parse_patterns(bad)


@pytest.mark.parametrize("spec,fields,name", [
    ("dense/8:0:0", {"dilation": [[1, 1, 8, 8]] * 2}, "heads:2xdense+2xD8-W0-P0"),
    ("8:2:1/-1:0:4:4:8", {"dilation": [[8, 8, -1, -1]] * 2, "window": [[2, 2, 0, 0]] * 2,
                          "sinks": [[1, 1, 4, 4]] * 2, "topk_blocks": [[0, 0, 4, 4]] * 2, "block_size": 8},
     "heads:2xD8-W2-P1+2xD-1-W0-P4-top4x8"),
])
def test_head_groups_run_as_a_folder_configured_per_head(random_folder, spec, fields, name):
    """Groups of heads set on a loaded folder give the logits of the same folder loaded with the per-head
    pattern written out head by head."""
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with open_model(random_folder) as loaded:
        [pattern] = parse_patterns(spec)
        assert loaded.set_pattern(pattern) == name
        got = loaded.logits(tokens)
        with pytest.raises(RatplusError, match="3 groups of heads do not split the model's 4 heads"):
            loaded.set_pattern(HeadGroups(((1, 0, 0),) * 3))
    defaults = {"window": 0, "sinks": 0, "topk_blocks": 0}
    model = AutoModelForCausalLM.from_pretrained(random_folder, trust_remote_code=True, local_files_only=True,
                                                 **{**defaults, **fields}).float().eval()
    with torch.no_grad():
        want = model(tokens, attention_mode="sparse").logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

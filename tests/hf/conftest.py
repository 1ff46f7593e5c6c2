"""Oracles for per-head patterns and top-k block attention (docs/spec.md §1.3, §4.4, §4.5), written out here
in fp64 with explicit loops and boolean masks; they never call the model's attention, selection or cache code.

A head pattern is ``(D, W, P)`` or ``(D, W, P, K, S, score)``; a layer pattern is one head pattern or a tuple
of one per head.
"""

from __future__ import annotations

import math

import pytest
import torch


def _heads(pattern, num_heads):
    return list(pattern) if isinstance(pattern[0], tuple) else [tuple(pattern)] * num_heads


def _base_visible(q: int, k: int, head) -> bool:
    d, w, p = head[:3]
    return k <= q and (q - k <= w or k < p or (d != -1 and (k + 1) % d == 0))


class Selection:
    """The smallest gap, over every query that chose among more candidates than it could take, between the
    weakest block taken and the strongest left out: a comparison the model could decide differently from this
    fp64 oracle (keys differ by rounding) only if the gap is tiny."""

    def __init__(self):
        self.min_gap = math.inf


def oracle_mask(q: torch.Tensor, k: torch.Tensor, head, q_offset: int = 0, selection: Selection | None = None):
    """(Tq, Tk) boolean: which keys each query of one (batch, head) sees. ``q`` (Tq, K) and ``k`` (Tk, K) are
    the rotated queries and keys (fp64); top-k selection is done here, block by block, in plain Python."""
    tq, tk = q.shape[0], k.shape[0]
    mask = torch.zeros(tq, tk, dtype=torch.bool)
    for i in range(tq):
        qpos = q_offset + i
        for j in range(tk):
            mask[i, j] = _base_visible(qpos, j, head)
    if len(head) == 3 or head[0] == 1:
        return mask
    top, size, score = head[3:]
    complete = tk // size
    summaries = []
    for b in range(complete):
        block = k[b * size:(b + 1) * size]
        summaries.append(block.max(dim=0).values if score == "max" else block.sum(dim=0) / size)
    for i in range(tq):
        qpos = q_offset + i
        own = qpos // size
        ranked = sorted(((-float(q[i].detach() @ summaries[b].detach()), b) for b in range(1, own)))
        taken = [b for _, b in ranked[:top - 2]]
        if selection is not None and len(ranked) > top - 2 > 0:
            selection.min_gap = min(selection.min_gap, ranked[top - 2][0] - ranked[top - 3][0])
        for b in [0, own, *taken]:
            for j in range(b * size, min((b + 1) * size, qpos + 1, tk)):
                mask[i, j] = True
    return mask


def oracle_attention(q, k, v, pattern, q_offset: int = 0, selection: Selection | None = None):
    """fp64 masked dense attention of q (B, H, Tq, K) over k, v (B, H, Tk, K) under a layer pattern."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    heads = _heads(pattern, q.shape[1])
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            mask = oracle_mask(q[b, h], k[b, h], heads[h], q_offset, selection)
            scores = (q[b, h] @ k[b, h].T) / math.sqrt(q.shape[-1])
            out[b, h] = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v[b, h]
    return out


def _rms_norm(x, gain, eps):
    return gain * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _rope(x, positions):
    half = x.shape[-1] // 2
    theta = torch.tensor([10000.0 ** (-2 * i / x.shape[-1]) for i in range(half)], dtype=torch.float64)
    angle = positions.double()[:, None] * theta[None, :]
    angle = torch.cat([angle, angle], dim=-1)
    return x * torch.cos(angle) + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * torch.sin(angle)


def oracle_logits(model, input_ids: torch.Tensor, patterns, selection: Selection | None = None) -> torch.Tensor:
    """fp64 logits of spec §1 from the model's weights, each layer's attention under ``patterns[layer]``."""
    cfg = model.config
    w = {name: t.double() for name, t in model.state_dict().items()}
    d, heads, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    batch, t = input_ids.shape
    x = w["model.embed_tokens.weight"][input_ids]

    def split(z):
        return z.reshape(batch, t, heads, hd).transpose(1, 2)

    for i, pattern in enumerate(patterns):
        p = f"model.layers.{i}."
        z = _rms_norm(x, w[p + "input_norm.weight"], cfg.rms_norm_eps) @ w[p + "mixer.in_proj.weight"].T
        o, q, k, v = (split(z[..., j * d:(j + 1) * d]) for j in range(4))
        if cfg.apply_recurrence:
            f = torch.sigmoid(split(z[..., 4 * d:5 * d]))
            hk, hv, ks, vs = torch.zeros_like(k[:, :, 0]), torch.zeros_like(v[:, :, 0]), [], []
            for s in range(t):
                hk = f[:, :, s] * hk + (1 - f[:, :, s]) * k[:, :, s]
                hv = f[:, :, s] * hv + (1 - f[:, :, s]) * v[:, :, s]
                ks.append(hk)
                vs.append(hv)
            k, v = torch.stack(ks, dim=2), torch.stack(vs, dim=2)
        positions = torch.arange(t)
        a = oracle_attention(_rope(q, positions), _rope(k, positions), v, pattern, selection=selection)
        a = a.transpose(1, 2).reshape(batch, t, d)
        x = x + (a * torch.sigmoid(o.transpose(1, 2).reshape(batch, t, d))) @ w[p + "mixer.out_proj.weight"].T
        u = _rms_norm(x, w[p + "ffn_norm.weight"], cfg.rms_norm_eps) @ w[p + "ffn.fc1.weight"].T
        x = x + (0.5 * u * (1 + torch.erf(u / math.sqrt(2)))) @ w[p + "ffn.fc2.weight"].T
    return _rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps) @ w["model.embed_tokens.weight"].T


class Oracles:
    Selection = Selection
    mask = staticmethod(oracle_mask)
    attention = staticmethod(oracle_attention)
    logits = staticmethod(oracle_logits)


@pytest.fixture(scope="session")
def oracle():
    """``oracle.mask``, ``oracle.attention``, ``oracle.logits`` and ``oracle.Selection`` (see the module)."""
    return Oracles

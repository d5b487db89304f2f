"""An independent dense reference decoder in plain PyTorch (no megatron imports).

The oracle of docs/design.md section 4: a single-process pre-LN GPT with the WeSaR math written out
directly, W_eff = gate * W_bar for every gated matrix. It loads a flat state dict in its own
canonical layout (separate q/k/v and gate/up weights, one gate per fused matrix), which the tests
build by gathering the shards of the megatron-core model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ReferenceArch:
    """Architecture of the reference decoder."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int
    max_seq_len: int
    swiglu: bool = False
    rope: bool = False
    rope_base: float = 10000.0
    tied: bool = False
    rmsnorm: bool = False
    norm_eps: float = 1e-5
    bias: bool = True


class GatedDense(torch.nn.Module):
    """y = gate * (x W^T) + b, with an optional scalar gate (None = ungated)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor | None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.bias = None if bias is None else torch.nn.Parameter(bias.clone())
        self.gate = None if gate is None else torch.nn.Parameter(gate.clone())

    def effective_weight(self) -> torch.Tensor:
        return self.weight if self.gate is None else self.gate * self.weight

    def forward(self, x):
        return F.linear(x, self.effective_weight(), self.bias)


def _split_dense(dense: GatedDense, prefix: str, name: str, parts: dict) -> dict:
    """Canonical entries of a (possibly fused) dense layer: its weight/bias rows split into
    `parts` ({canonical part name: rows}), and its gate under `name`."""
    out = {}
    for leaf in ("weight", "bias"):
        tensor = getattr(dense, leaf)
        if tensor is not None:
            for part, piece in zip(parts, tensor.split(list(parts.values()))):
                out[f"{prefix}{part}.{leaf}"] = piece
    if dense.gate is not None:
        out[f"{prefix}{name}.gate"] = dense.gate
    return out


class Norm(torch.nn.Module):
    def __init__(self, weight, bias, rms: bool, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.bias = None if bias is None else torch.nn.Parameter(bias.clone())
        self.rms, self.eps = rms, eps

    def forward(self, x):
        if self.rms:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x, base: float):
    """Rotary embedding (rotate-half form) of x: [batch, heads, seq, head_dim].

    The angles and their cos/sin are computed in float32, as megatron-core defines them."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return x * angles.cos().to(x.dtype) + _rotate_half(x) * angles.sin().to(x.dtype)


class Block(torch.nn.Module):
    def __init__(self, arch: ReferenceArch, sd: dict, prefix: str):
        super().__init__()
        self.arch = arch

        def get(name):
            return sd.get(prefix + name)

        self.ln1 = Norm(get("ln1.weight"), get("ln1.bias"), arch.rmsnorm, arch.norm_eps)
        qkv_w = torch.cat([get("q.weight"), get("k.weight"), get("v.weight")])
        qkv_b = None if get("q.bias") is None else torch.cat(
            [get("q.bias"), get("k.bias"), get("v.bias")]
        )
        self.qkv = GatedDense(qkv_w, qkv_b, get("qkv.gate"))
        self.proj = GatedDense(get("proj.weight"), get("proj.bias"), get("proj.gate"))
        self.ln2 = Norm(get("ln2.weight"), get("ln2.bias"), arch.rmsnorm, arch.norm_eps)
        if arch.swiglu:
            fc1_w = torch.cat([get("fc1_gate.weight"), get("fc1_up.weight")])
            fc1_b = None if get("fc1_gate.bias") is None else torch.cat(
                [get("fc1_gate.bias"), get("fc1_up.bias")]
            )
        else:
            fc1_w, fc1_b = get("fc1.weight"), get("fc1.bias")
        self.fc1 = GatedDense(fc1_w, fc1_b, get("fc1.gate"))
        self.fc2 = GatedDense(get("fc2.weight"), get("fc2.bias"), get("fc2.gate"))

    def canonical_state(self, prefix: str) -> dict:
        """This block's tensors under the canonical names it was loaded from."""
        d, ffn = self.arch.hidden_size, self.arch.ffn_hidden_size
        out = {f"{prefix}ln1.{k}": v for k, v in self.ln1.named_parameters()}
        out.update({f"{prefix}ln2.{k}": v for k, v in self.ln2.named_parameters()})
        out.update(_split_dense(self.qkv, prefix, "qkv", {"q": d, "k": d, "v": d}))
        out.update(_split_dense(self.proj, prefix, "proj", {"proj": d}))
        fc1_parts = {"fc1_gate": ffn, "fc1_up": ffn} if self.arch.swiglu else {"fc1": ffn}
        out.update(_split_dense(self.fc1, prefix, "fc1", fc1_parts))
        out.update(_split_dense(self.fc2, prefix, "fc2", {"fc2": d}))
        return out

    def attention(self, x):
        b, s, d = x.shape
        h = self.arch.num_heads
        hd = d // h
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, s, h, hd).transpose(1, 2) for t in (q, k, v))
        if self.arch.rope:
            q, k = _rope(q, self.arch.rope_base), _rope(k, self.arch.rope_base)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        ctx = scores.softmax(-1) @ v
        return self.proj(ctx.transpose(1, 2).reshape(b, s, d))

    def mlp(self, x):
        h = self.fc1(x)
        if self.arch.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.fc2(h)

    def forward(self, x):
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ReferenceGPT(torch.nn.Module):
    """Pre-LN decoder; `forward(tokens, labels)` returns the mean next-token cross-entropy."""

    def __init__(self, arch: ReferenceArch, sd: dict):
        super().__init__()
        self.arch = arch
        self.embedding = torch.nn.Parameter(sd["embedding.weight"].clone())
        gate = sd.get("embedding.gate")
        self.embedding_gate = None if gate is None else torch.nn.Parameter(gate.clone())
        pos = sd.get("position.weight")
        self.position = None if pos is None else torch.nn.Parameter(pos.clone())
        self.blocks = torch.nn.ModuleList(
            Block(arch, sd, f"layers.{i}.") for i in range(arch.num_layers)
        )
        self.final_norm = Norm(
            sd["final_norm.weight"], sd.get("final_norm.bias"), arch.rmsnorm, arch.norm_eps
        )
        gate = sd.get("output.gate")
        self.output_gate = None if gate is None else torch.nn.Parameter(gate.clone())
        self.output = None if arch.tied else torch.nn.Parameter(sd["output.weight"].clone())

    def gates(self) -> dict:
        """name -> gate parameter, in the canonical names of the state dict."""
        out = {"embedding.gate": self.embedding_gate, "output.gate": self.output_gate}
        for i, block in enumerate(self.blocks):
            for name in ("qkv", "proj", "fc1", "fc2"):
                out[f"layers.{i}.{name}.gate"] = getattr(block, name).gate
        return {k: v for k, v in out.items() if v is not None}

    def canonical_state_dict(self) -> dict:
        """Every tensor under the canonical names of the state dict it was loaded from."""
        out = {"embedding.weight": self.embedding, "final_norm.weight": self.final_norm.weight}
        if self.final_norm.bias is not None:
            out["final_norm.bias"] = self.final_norm.bias
        if self.position is not None:
            out["position.weight"] = self.position
        if self.output is not None:
            out["output.weight"] = self.output
        for i, block in enumerate(self.blocks):
            out.update(block.canonical_state(f"layers.{i}."))
        out.update(self.gates())
        return {k: v.detach().clone() for k, v in out.items()}

    def forward(self, tokens, labels):
        table = self.embedding
        if self.embedding_gate is not None:
            table = self.embedding_gate * table
        x = F.embedding(tokens, table)
        if self.position is not None:
            x = x + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        out_w = self.embedding if self.arch.tied else self.output
        if self.output_gate is not None:
            out_w = self.output_gate * out_w
        logits = F.linear(x, out_w)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def reference_adamw(model: torch.nn.Module, lr, betas, eps, weight_decay):
    """AdamW with weight decay on matrices only (biases, norms and gates are not decayed)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        eps=eps,
    )

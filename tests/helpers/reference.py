"""An independent dense reference decoder in plain PyTorch (no megatron imports).

The oracle of docs/design.md section 4: a single-process pre-LN GPT with the WeSaR math written out
directly, W_eff = gate * W_bar for every gated matrix. It holds every matrix separately, with
its own gate (W_q, W_k, W_v with grouped-query attention's fewer key/value heads; W_gate and W_up
of SwiGLU), and loads a flat state dict in that canonical layout, which the tests build by
gathering the shards of the megatron-core model and splitting its fused matrices.
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
    num_query_groups: int | None = None  # None: one key/value head per query head (MHA)
    swiglu: bool = False
    share_glu_gates: bool = False  # SwiGLU: one gate `fc1.gate` for W_gate and W_up
    rope: bool = False
    rope_base: float = 10000.0
    tied: bool = False
    rmsnorm: bool = False
    norm_eps: float = 1e-5
    bias: bool = True

    @property
    def groups(self) -> int:
        """The number of key/value heads."""
        return self.num_query_groups or self.num_heads


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
    """One pre-LN layer: every matrix (W_q, W_k, W_v, W_o, W_gate, W_up, W_d) a separate dense
    layer with its own gate, in the canonical names `layers.<i>.<matrix>.{weight,bias,gate}`."""

    def __init__(self, arch: ReferenceArch, sd: dict, prefix: str):
        super().__init__()
        self.arch = arch

        def get(name):
            return sd.get(prefix + name)

        def dense(name):
            return GatedDense(get(f"{name}.weight"), get(f"{name}.bias"), get(f"{name}.gate"))

        self.ln1 = Norm(get("ln1.weight"), get("ln1.bias"), arch.rmsnorm, arch.norm_eps)
        self.ln2 = Norm(get("ln2.weight"), get("ln2.bias"), arch.rmsnorm, arch.norm_eps)
        names = ["q", "k", "v", "proj"]
        names += ["fc1_gate", "fc1_up"] if arch.swiglu else ["fc1"]
        self.dense = torch.nn.ModuleDict({name: dense(name) for name in names + ["fc2"]})
        self.shared_glu_gate = None
        if arch.swiglu and arch.share_glu_gates and get("fc1.gate") is not None:
            self.shared_glu_gate = torch.nn.Parameter(get("fc1.gate").clone())

    def gates(self, prefix: str) -> dict:
        """canonical name -> gate parameter of this block."""
        out = {f"{prefix}{name}.gate": d.gate for name, d in self.dense.items()
               if d.gate is not None}
        if self.shared_glu_gate is not None:
            out[f"{prefix}fc1.gate"] = self.shared_glu_gate
        return out

    def canonical_state(self, prefix: str) -> dict:
        """This block's tensors under the canonical names it was loaded from."""
        out = {f"{prefix}ln1.{k}": v for k, v in self.ln1.named_parameters()}
        out.update({f"{prefix}ln2.{k}": v for k, v in self.ln2.named_parameters()})
        for name, d in self.dense.items():
            out.update({f"{prefix}{name}.{k}": v for k, v in d.named_parameters()})
        out.update(self.gates(prefix))
        return out

    def _linear(self, name, x):
        if self.shared_glu_gate is not None and name.startswith("fc1_"):
            d = self.dense[name]
            return F.linear(x, self.shared_glu_gate * d.weight, d.bias)
        return self.dense[name](x)

    def attention(self, x):
        b, s, d = x.shape
        h, groups = self.arch.num_heads, self.arch.groups
        hd = d // h
        q = self._linear("q", x).view(b, s, h, hd).transpose(1, 2)
        k, v = (self._linear(n, x).view(b, s, groups, hd).transpose(1, 2) for n in "kv")
        k, v = (t.repeat_interleave(h // groups, dim=1) for t in (k, v))  # query head -> group
        if self.arch.rope:
            q, k = _rope(q, self.arch.rope_base), _rope(k, self.arch.rope_base)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        ctx = scores.softmax(-1) @ v
        return self._linear("proj", ctx.transpose(1, 2).reshape(b, s, d))

    def mlp(self, x):
        if self.arch.swiglu:
            h = F.silu(self._linear("fc1_gate", x)) * self._linear("fc1_up", x)
        else:
            h = F.gelu(self._linear("fc1", x))
        return self._linear("fc2", h)

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
        gate = sd.get("position.gate")
        self.position_gate = None if gate is None else torch.nn.Parameter(gate.clone())
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
        out = {"embedding.gate": self.embedding_gate, "position.gate": self.position_gate,
               "output.gate": self.output_gate}
        for i, block in enumerate(self.blocks):
            out.update(block.gates(f"layers.{i}."))
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
            position = self.position[: tokens.shape[1]]
            if self.position_gate is not None:
                position = self.position_gate * position
            x = x + position
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

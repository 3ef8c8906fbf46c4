"""Small reference Step3p5 models in plain torch, in the native and the HF state-dict layout.

Both layouts compute the same function; only the MoE experts' storage differs (:mod:`lazysd.adapters.step3p5`):

* ``"hf"``: ``moe.{gate,up}_proj.weight`` [E, I, D], ``moe.down_proj.weight`` [E, D, I], fp32
  buffer ``moe.router_bias``; experts compute ``F.linear(x, W[e])``.
* ``"native"``: ``moe.experts.gate_and_up_projs`` [E, D, 2I] (gate columns first),
  ``moe.experts.down_projs`` [E, I, D], fp32 buffer ``moe.gate.e_score_correction_bias``;
  experts compute ``x @ W[e]``.

There is no rotary embedding: it has no parameters, so it changes nothing about the keys, and
the causal (and sliding-window) mask still makes the model a decoder. MTP layers are left out,
as in native models built from ``num_hidden_layers``.

Example:
    >>> import torch
    >>> from lazysd.testing.step3p5 import Step3p5Spec
    >>> model = Step3p5Model(Step3p5Spec.tiny(), layout="native")
    >>> model(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 64])
    >>> Step3p5Model(Step3p5Spec.flash(), layout="hf", device="meta").lm_head.weight.shape
    torch.Size([128896, 4096])
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lazysd.testing.step3p5 import Step3p5Spec

__all__ = ["HFMoE", "NativeMoE", "Step3p5Model"]

Layout = Literal["native", "hf"]


@torch.no_grad()
def _init(module: nn.Module) -> None:
    # 1-D parameters are all zero-centred norm weights (gamma - 1): zero means identity.
    # Meta tensors have no values, and their normal_ runs a slow Python reference: skip them.
    for p in module.parameters():
        if not p.is_meta:
            p.zero_() if p.ndim == 1 else p.normal_(0.0, 0.02)


class RMSNorm(nn.Module):
    """RMSNorm with a zero-centred weight: ``x_normed * (1 + weight)``, computed in fp32."""

    def __init__(self, dim: int, eps: float, **f: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim, **f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: dense mlp and shared expert."""

    def __init__(self, dim: int, inter: int, **f: Any) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False, **f)
        self.up_proj = nn.Linear(dim, inter, bias=False, **f)
        self.down_proj = nn.Linear(inter, dim, bias=False, **f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """GQA with per-head q/k RMSNorm and a head-wise output gate ``sigmoid(g_proj(x))``."""

    def __init__(self, spec: Step3p5Spec, layer: int, **f: Any) -> None:
        super().__init__()
        D, hd = spec.hidden_size, spec.head_dim
        self.nh, self.kv, self.hd = spec.num_heads(layer), spec.num_attention_groups, hd
        self.window = None if spec.is_full_attention(layer) else spec.sliding_window
        self.q_proj = nn.Linear(D, self.nh * hd, bias=False, **f)
        self.k_proj = nn.Linear(D, self.kv * hd, bias=False, **f)
        self.v_proj = nn.Linear(D, self.kv * hd, bias=False, **f)
        self.o_proj = nn.Linear(self.nh * hd, D, bias=False, **f)
        self.g_proj = nn.Linear(D, self.nh, bias=False, **f)
        self.q_norm = RMSNorm(hd, spec.rms_norm_eps, **f)
        self.k_norm = RMSNorm(hd, spec.rms_norm_eps, **f)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.q_norm(self.q_proj(x_BTD).view(B, T, self.nh, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x_BTD).view(B, T, self.kv, self.hd)).transpose(1, 2)
        v = self.v_proj(x_BTD).view(B, T, self.kv, self.hd).transpose(1, 2)
        k, v = (t.repeat_interleave(self.nh // self.kv, dim=1) for t in (k, v))
        pos = torch.arange(T, device=x_BTD.device)
        dist = pos[:, None] - pos[None, :]
        mask = dist >= 0
        if self.window is not None:
            mask &= dist < self.window
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
        out = out * torch.sigmoid(self.g_proj(x_BTD)).unsqueeze(-1)
        return self.o_proj(out.reshape(B, T, self.nh * self.hd))


class _Weights(nn.Module):
    """Holds one grouped ``weight`` [E, out, in], like the checkpoint's MoELinear."""

    def __init__(self, *shape: int, **f: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, **f))


class _MoE(nn.Module):
    """Sigmoid router with a correction bias that only affects which experts are chosen."""

    def __init__(self, spec: Step3p5Spec) -> None:
        super().__init__()
        self.top_k, self.scale = spec.moe_top_k, spec.moe_router_scaling_factor
        self.num_experts = spec.moe_num_experts

    def _router(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # (router weight [E, D], correction bias [E])

    def _expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def routing(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token: fp32 weights [N, k] (normalised, times the scaling factor) and expert ids."""
        weight, bias = self._router()
        scores = torch.sigmoid(F.linear(x_ND.float(), weight.float()))
        ids = (scores + bias.float()).topk(self.top_k, dim=-1).indices
        w = scores.gather(-1, ids)
        return w / w.sum(-1, keepdim=True) * self.scale, ids

    def _local_experts(self) -> range:
        """Experts this rank computes (all of them unless experts are sharded)."""
        return range(self.num_experts)

    def _reduce(self, out: torch.Tensor) -> torch.Tensor:
        """Combine the partial outputs of ranks that each computed some experts."""
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_ND = x.reshape(-1, x.shape[-1])
        w, ids = self.routing(x_ND)
        out = torch.zeros_like(x_ND)
        for e in self._local_experts():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel():
                y = self._expert(e, x_ND[tok]) * w[tok, slot, None].to(x.dtype)
                out.index_add_(0, tok, y)
        return self._reduce(out).view(x.shape)


class _NativeGate(nn.Module):
    def __init__(self, spec: Step3p5Spec, **f: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(spec.moe_num_experts, spec.hidden_size, **f))
        # A buffer, not a parameter: it is adjusted by load balancing, never by gradients.
        bias = torch.zeros(spec.moe_num_experts, dtype=torch.float32, device=f.get("device"))
        self.register_buffer("e_score_correction_bias", bias)


class _GroupedExperts(nn.Module):
    def __init__(self, spec: Step3p5Spec, **f: Any) -> None:
        super().__init__()
        E, D, I = spec.moe_num_experts, spec.hidden_size, spec.moe_intermediate_size
        self.gate_and_up_projs = nn.Parameter(torch.empty(E, D, 2 * I, **f))
        self.down_projs = nn.Parameter(torch.empty(E, I, D, **f))


class NativeMoE(_MoE):
    """Routed experts in the native layout: ``gate.*`` and ``experts.*`` keys.

    Example:
        >>> moe = NativeMoE(Step3p5Spec.tiny())
        >>> list(moe.state_dict())
        ['gate.weight', 'gate.e_score_correction_bias', 'experts.gate_and_up_projs', 'experts.down_projs']
    """

    def __init__(self, spec: Step3p5Spec, **f: Any) -> None:
        super().__init__(spec)
        self.gate = _NativeGate(spec, **f)
        self.experts = _GroupedExperts(spec, **f)
        _init(self)

    def _router(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate.weight, self.gate.e_score_correction_bias

    # Expert parallelism: with experts held as DTensors sharded Shard(0) over an "ep" mesh dim,
    # each rank runs its own experts for every token and the partial outputs are all-reduced.
    def _ep(self) -> tuple[Any, int, int] | None:
        w = self.experts.gate_and_up_projs
        if not hasattr(w, "placements"):
            return None
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        dims = [i for i, p in enumerate(w.placements) if p == Shard(0)]
        shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
        return w.device_mesh.get_group(dims[0]), offset[0], shape[0]

    def _local_experts(self) -> range:
        ep = self._ep()
        return range(self.num_experts) if ep is None else range(ep[1], ep[1] + ep[2])

    def _reduce(self, out: torch.Tensor) -> torch.Tensor:
        ep = self._ep()
        if ep is not None:
            import torch.distributed as dist

            dist.all_reduce(out, group=ep[0])
        return out

    def _expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        w_gu, w_down = self.experts.gate_and_up_projs, self.experts.down_projs
        ep = self._ep()
        if ep is not None:  # local shard, local index
            w_gu, w_down, e = w_gu.to_local(), w_down.to_local(), e - ep[1]
        g, u = (x_ND @ w_gu[e]).chunk(2, dim=-1)
        return (F.silu(g) * u) @ w_down[e]


class HFMoE(_MoE):
    """Routed experts in the HF layout: ``gate.weight``, ``router_bias``, ``{gate,up,down}_proj``.

    Example:
        >>> moe = HFMoE(Step3p5Spec.tiny())
        >>> sorted(moe.state_dict())
        ['down_proj.weight', 'gate.weight', 'gate_proj.weight', 'router_bias', 'up_proj.weight']
    """

    def __init__(self, spec: Step3p5Spec, **f: Any) -> None:
        super().__init__(spec)
        E, D, I = spec.moe_num_experts, spec.hidden_size, spec.moe_intermediate_size
        self.gate = nn.Linear(D, E, bias=False, **f)
        bias = torch.zeros(E, dtype=torch.float32, device=f.get("device"))
        self.register_buffer("router_bias", bias)
        self.gate_proj = _Weights(E, I, D, **f)
        self.up_proj = _Weights(E, I, D, **f)
        self.down_proj = _Weights(E, D, I, **f)
        _init(self)

    def _router(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate.weight, self.router_bias

    def _expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        h = F.silu(F.linear(x_ND, self.gate_proj.weight[e])) * F.linear(x_ND, self.up_proj.weight[e])
        return F.linear(h, self.down_proj.weight[e])


class DecoderLayer(nn.Module):
    """Pre-norm attention, then a dense SwiGLU mlp or routed experts plus a shared expert."""

    def __init__(self, spec: Step3p5Spec, layer: int, layout: Layout, **f: Any) -> None:
        super().__init__()
        D = spec.hidden_size
        self.input_layernorm = RMSNorm(D, spec.rms_norm_eps, **f)
        self.self_attn = Attention(spec, layer, **f)
        self.post_attention_layernorm = RMSNorm(D, spec.rms_norm_eps, **f)
        self.is_moe = spec.is_moe(layer)
        if self.is_moe:
            self.moe = (NativeMoE if layout == "native" else HFMoE)(spec, **f)
            self.share_expert = SwiGLU(D, spec.share_expert_dim, **f)
        else:
            self.mlp = SwiGLU(D, spec.intermediate_size, **f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x))
        n = self.post_attention_layernorm(h)
        return h + (self.moe(n) + self.share_expert(n) if self.is_moe else self.mlp(n))


class _Backbone(nn.Module):
    def __init__(self, spec: Step3p5Spec, layout: Layout, **f: Any) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, **f)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, L, layout, **f) for L in range(spec.num_hidden_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, **f)


class Step3p5Model(nn.Module):
    """Causal Step3p5 decoder (main layers only) whose ``state_dict()`` uses real key names.

    Args:
        spec: model sizes.
        layout: ``"hf"`` (checkpoint keys) or ``"native"`` (grouped-experts keys).
        dtype: parameter dtype; router biases are always fp32 buffers.
        device: any device, including ``"meta"`` for shape-only models.

    ``forward(input_ids [B, T]) -> logits [B, T, V]``.
    """

    def __init__(
        self,
        spec: Step3p5Spec,
        *,
        layout: Layout,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if layout not in ("native", "hf"):
            raise ValueError(f"layout must be 'native' or 'hf', got {layout!r}")
        f = {"device": device, "dtype": dtype}
        self.spec, self.layout = spec, layout
        self.model = _Backbone(spec, layout, **f)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, **f)
        _init(self)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))

"""``MomentumMetrics``: statistics of the optimizer's state (Adam moments, SGD momentum buffers).

For Adam/AdamW (state ``exp_avg`` = m, ``exp_avg_sq`` = v, ``step`` = t; ``max_exp_avg_sq`` replaces
v under amsgrad), over the N entries of every parameter with state:

    exp_avg_norm         = sqrt(Σ m²)           exp_avg_abs_mean     = Σ |m| / N
    exp_avg_sq_mean      = Σ v / N              exp_avg_sq_sqrt_mean = Σ sqrt(v) / N
    adam_update_rms      = sqrt(Σ u² / N),  u = m̂ / (sqrt(v̂) + ε),  m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)
    grad_sign_agreement  = #{sign m = sign g} / #{g ≠ 0}     (only when gradients are present)

u is the direction Adam applied at its last step: without weight decay, W_t − W_{t−1} = −lr · u
(β1, β2, ε from the parameter's group). For SGD with momentum: ``buffer_norm`` = sqrt(Σ b²) of
the ``momentum_buffer`` states. Per layer (``per_layer``): ``layer_N/exp_avg_norm``,
``layer_N/exp_avg_sq_mean`` (Adam) or ``layer_N/buffer_norm`` (SGD).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, Optional

import torch

from analog.monitor.base import AnalysisContext, MetricComputer
from analog.monitor.parameter_change import layer_index
from analog.monitor.primitives import ParameterDelta, ParameterSnapshot

PREFIX = "momentum/"


def _step_count(state: Dict[str, Any]) -> float:
    step = state.get("step", 0)
    return float(step.item() if isinstance(step, torch.Tensor) else step)


def _adam_sums(state: Dict[str, Any], group: Dict[str, Any], grad: Optional[torch.Tensor]) -> Dict[str, float]:
    m = state["exp_avg"].detach().double()
    v = state.get("max_exp_avg_sq", state["exp_avg_sq"]).detach().double()
    beta1, beta2 = group.get("betas", (0.9, 0.999))
    t = _step_count(state)
    if t < 1:
        raise ValueError("MomentumMetrics: Adam state with step 0 (no step applied yet)")
    u = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group.get("eps", 1e-8))
    sums = {
        "n": m.numel(),
        "m_sq": float(m.square().sum()),
        "m_abs": float(m.abs().sum()),
        "v": float(v.sum()),
        "v_sqrt": float(v.sqrt().sum()),
        "u_sq": float(u.square().sum()),
    }
    if grad is not None:
        g = grad.detach().double().reshape(m.shape)
        nonzero = g != 0
        sums["nonzero_grad"] = int(nonzero.sum())
        sums["agree"] = int((torch.sign(m) == torch.sign(g))[nonzero].sum())
    return sums


class MomentumMetrics(MetricComputer):
    """Optimizer-state statistics (module docstring) from ``context.optimizer``; raises
    ``ValueError`` (logged by the manager) without an optimizer or when it keeps no state analog
    knows (Adam, AdamW, SGD with momentum, and optimizers with the same state names)."""

    def __init__(self, per_layer: bool = False):
        self.per_layer = per_layer

    def compute(
        self,
        delta: Optional[ParameterDelta] = None,
        snapshot: Optional[ParameterSnapshot] = None,
        context: Optional[AnalysisContext] = None,
        **kwargs,
    ) -> Dict[str, float]:
        optimizer = context.optimizer if context is not None else None
        if optimizer is None:
            raise ValueError("MomentumMetrics needs the optimizer: on_optimizer_step(model, inputs=..., optimizer=opt)")
        names = {id(p): n for n, p in context.model.named_parameters()} if context.model is not None else {}
        total: Dict[str, float] = defaultdict(float)
        layers: Dict[int, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
        seen_keys = set()
        for group in optimizer.param_groups:
            for param in group["params"]:
                state = optimizer.state.get(param) or {}
                seen_keys.update(state)
                sums = self._sums(state, group, param.grad)
                if sums is None:
                    continue
                index = layer_index(names.get(id(param), ""))
                for key, value in sums.items():
                    total[key] += value
                    if index is not None:
                        layers[index][key] += value
        if not total:
            kind = type(optimizer).__name__
            raise ValueError(
                f"MomentumMetrics: {kind} keeps no exp_avg/exp_avg_sq or momentum_buffer state "
                f"(state keys: {sorted(map(str, seen_keys)) or 'none'})"
            )
        metrics = {PREFIX + k: v for k, v in _finish(total).items()}
        if self.per_layer:
            for index in sorted(layers):
                stats = _finish(layers[index])
                for key in ("exp_avg_norm", "exp_avg_sq_mean", "buffer_norm"):
                    if key in stats:
                        metrics[f"{PREFIX}layer_{index}/{key}"] = stats[key]
        return metrics

    @staticmethod
    def _sums(state, group, grad) -> Optional[Dict[str, float]]:
        if "exp_avg" in state and "exp_avg_sq" in state:
            return _adam_sums(state, group, grad)
        buffer = state.get("momentum_buffer")
        if isinstance(buffer, torch.Tensor):
            return {"b_sq": float(buffer.detach().double().square().sum())}
        return None


def _finish(sums: Dict[str, float]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    n = sums.get("n", 0)
    if n:
        out.update(
            exp_avg_norm=math.sqrt(sums["m_sq"]),
            exp_avg_abs_mean=sums["m_abs"] / n,
            exp_avg_sq_mean=sums["v"] / n,
            exp_avg_sq_sqrt_mean=sums["v_sqrt"] / n,
            adam_update_rms=math.sqrt(sums["u_sq"] / n),
        )
        if sums.get("nonzero_grad"):
            out["grad_sign_agreement"] = sums["agree"] / sums["nonzero_grad"]
    if "b_sq" in sums:
        out["buffer_norm"] = math.sqrt(sums["b_sq"])
    return out

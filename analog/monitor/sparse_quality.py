"""``SparseQualityMetrics``: how well a sparsified update reproduces the outputs of the full update.

For a threshold t, keep the changes with |Δ| > t and drop the others:

    W_t = where(|Δ| > t, W_new, W_old)        (= W_old + Δ ⊙ 1[|Δ| > t])

then run the model once with W_new (full) and once with W_t (sparse) on the same inputs and
compare the logits z_full, z_sparse (shape (..., V)) position by position:

    kl       = mean_i Σ_v p_full,iv (log p_full,iv − log p_sparse,iv),   p = softmax(z)
    cosine   = mean_i <z_full,i, z_sparse,i> / (‖z_full,i‖ ‖z_sparse,i‖)
    mse      = mean over all elements of (z_full − z_sparse)²
    top1     = mean_i 1[argmax z_full,i = argmax z_sparse,i]

Positions are weighted by ``attention_mask`` when the inputs carry one of the logits' leading
shape. The random baseline keeps, in every tensor, the same fraction of entries as the magnitude
mask (exactly as many for tensors up to 2^16 entries) but chosen uniformly at random. The model's
parameters are swapped (``param.data = ...``), never written to, so they are restored
bit-exactly; the model runs in eval mode under ``no_grad``, and afterwards every module is put back
in the mode it had (not ``model.train()``, which would switch a BatchNorm the user froze in eval mode
back to training).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from analog.monitor.base import AnalysisContext, MetricComputer
from analog.monitor.config import DEFAULT_THRESHOLDS, format_threshold
from analog.monitor.primitives import ParameterDelta, ParameterSnapshot

PREFIX = "sparse/"


def extract_logits(outputs: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, an object with ``.logits`` (Hugging Face), a dict
    with ``"logits"``, or a tuple/list whose first element is one of those."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs:
        return extract_logits(outputs[0])
    raise TypeError(f"cannot find logits in model output of type {type(outputs).__name__}")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    return type(value).__name__


def run_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Forward ``inputs`` (tensor, tuple of positional args, or dict of kwargs without ``labels``).

    A call that fails with a ``TypeError`` (wrong arguments: typically a DataLoader's ``(x, y)`` batch
    unpacked as ``model(x, y)``) is re-raised saying how the inputs were passed and what to pass instead.
    """
    device = next(model.parameters()).device
    inputs = _to_device(inputs, device)
    if isinstance(inputs, Mapping):
        kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        call, shown = (lambda: model(**kwargs)), "model(**inputs) with keys " + ", ".join(map(str, kwargs))
    elif isinstance(inputs, (tuple, list)):
        call = lambda: model(*inputs)  # noqa: E731
        shown = f"model(*inputs) with {len(inputs)} positional arguments ({', '.join(map(_describe, inputs))})"
    else:
        call, shown = (lambda: model(inputs)), f"model(inputs) with {_describe(inputs)}"
    try:
        outputs = call()
    except TypeError as error:
        raise TypeError(
            f"sparse quality ran {shown} and it failed: {error}. Pass inputs= as the model is called: a "
            "tensor for model(x), a tuple for model(*args), a dict for model(**kwargs) ('labels' is dropped); "
            "for a DataLoader batch (x, y) pass inputs=x"
        ) from error
    return extract_logits(outputs).detach().float()


def compare_logits(
    full: torch.Tensor, sparse: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> Dict[str, float]:
    """kl, cosine, mse, top1_agree between two logits tensors of shape (..., V) (see module doc),
    computed in float64; ``weights`` (shape (...,), e.g. an attention mask) weights the positions."""
    full2 = full.reshape(-1, full.shape[-1]).double()
    sparse2 = sparse.reshape(-1, sparse.shape[-1]).double()
    w = torch.ones(full2.shape[0]) if weights is None else weights.reshape(-1).double()
    w = w.to(full2.device)
    total = w.sum().clamp_min(1e-12)
    log_p, log_q = F.log_softmax(full2, dim=-1), F.log_softmax(sparse2, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)  # ≥ 0; rounding can dip below
    cosine = F.cosine_similarity(full2, sparse2, dim=-1, eps=1e-12)
    agree = (full2.argmax(-1) == sparse2.argmax(-1)).float()
    mse = ((full2 - sparse2).square().mean(-1) * w).sum() / total
    return {
        "kl": float((kl * w).sum() / total),
        "cosine": float((cosine * w).sum() / total),
        "mse": float(mse),
        "top1_agree": float((agree * w).sum() / total),
    }


def _position_weights(inputs: Any, logits: torch.Tensor) -> Optional[torch.Tensor]:
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(logits.shape[:-1]):
        return mask
    return None


@contextmanager
def swapped_parameters(model: nn.Module, new_data: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily point ``param.data`` at ``new_data[name]``; the original storages are put back
    untouched on exit (even after an exception), so the weights are restored bit-exactly."""
    params = dict(model.named_parameters())
    originals = {}
    try:
        for name, data in new_data.items():
            originals[name] = params[name].data
            params[name].data = data
        yield
    finally:
        for name, data in originals.items():
            params[name].data = data


class SparseQualityMetrics(MetricComputer):
    """Output agreement of magnitude-sparsified updates (and random masks of equal sparsity).

    Keys (under ``sparse/``) for each threshold t: ``kl_at_{t}``, ``cosine_at_{t}``, ``mse_at_{t}``,
    ``top1_agree_at_{t}``, ``kept_ratio_at_{t}`` = #{|Δ| > t}/N, ``unchanged_ratio_at_{t}`` =
    1 − kept_ratio; with ``include_random`` also ``kl_at_{t}_random``, ``cosine_at_{t}_random``,
    ``mse_at_{t}_random``, ``top1_agree_at_{t}_random``, ``kept_ratio_at_{t}_random`` (the random
    mask's own kept fraction, see ``_random_like``).
    Needs ``context.model`` and ``context.inputs``; returns ``{}`` without them.
    """

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, include_random: bool = True, seed=0):
        if not thresholds:
            raise ValueError("SparseQualityMetrics needs at least one threshold")
        self.thresholds = sorted(float(t) for t in thresholds)
        self.include_random = include_random
        self.seed = seed

    def compute(
        self,
        delta: ParameterDelta,
        snapshot: ParameterSnapshot,
        context: AnalysisContext,
        **kwargs,
    ) -> Dict[str, float]:
        model, inputs = context.model, context.inputs
        if model is None or inputs is None:
            return {}
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                return self._measure(model, inputs, delta, snapshot)
        finally:
            for module, training in modes:  # each module's own mode (a frozen BatchNorm stays in eval)
                module.training = training

    def _measure(self, model, inputs, delta: ParameterDelta, snapshot: ParameterSnapshot) -> Dict[str, float]:
        full = run_model(model, inputs)
        weights = _position_weights(inputs, full)
        params = dict(model.named_parameters())
        generator = torch.Generator().manual_seed(self.seed)
        metrics: Dict[str, float] = {}
        for threshold in self.thresholds:
            label = format_threshold(threshold)
            masks = {name: d.abs() > threshold for name, d in delta.items()}
            kept = sum(int(torch.count_nonzero(m)) for m in masks.values())
            kept_ratio = kept / delta.numel if delta.numel else 0.0
            scores = self._score(model, inputs, full, weights, params, snapshot, masks)
            metrics.update({f"{PREFIX}{k}_at_{label}": v for k, v in scores.items()})
            metrics[f"{PREFIX}kept_ratio_at_{label}"] = kept_ratio
            metrics[f"{PREFIX}unchanged_ratio_at_{label}"] = 1.0 - kept_ratio
            if self.include_random:
                random_masks = {n: _random_like(m, generator) for n, m in masks.items()}
                scores = self._score(model, inputs, full, weights, params, snapshot, random_masks)
                metrics.update({f"{PREFIX}{k}_at_{label}_random": v for k, v in scores.items()})
                random_kept = sum(int(torch.count_nonzero(m)) for m in random_masks.values())
                metrics[f"{PREFIX}kept_ratio_at_{label}_random"] = random_kept / max(delta.numel, 1)
        return metrics

    @staticmethod
    def _score(model, inputs, full, weights, params, snapshot, masks) -> Dict[str, float]:
        """Outputs with W = where(mask, W_new, W_old) compared with the full outputs."""
        sparse_data = {}
        for name, mask in masks.items():
            current = params[name].data
            old = snapshot[name].to(device=current.device, dtype=current.dtype)
            sparse_data[name] = torch.where(mask.to(current.device), current, old)
        with swapped_parameters(model, sparse_data):
            sparse = run_model(model, inputs)
        return compare_logits(full, sparse, weights)


#: tensors up to this size get exactly as many random entries as the magnitude mask keeps
EXACT_RANDOM_MAX = 1 << 16


def _random_like(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random mask of ``mask``'s shape keeping the same fraction k/n of entries.

    Up to ``EXACT_RANDOM_MAX`` entries: exactly k, placed by a random permutation; above it each
    entry is kept with probability k/n: a relative deviation of about 1/sqrt(k) in the count
    (under 0.5% there), at a tenth of the cost of a permutation of n."""
    n, kept = mask.numel(), int(torch.count_nonzero(mask))
    if kept in (0, n):
        return mask.clone()
    if n > EXACT_RANDOM_MAX:
        return torch.rand(mask.shape, generator=generator, device=mask.device) < (kept / n)
    out = torch.zeros(n, dtype=torch.bool)
    out[torch.randperm(n, generator=generator)[:kept]] = True
    return out.reshape(mask.shape).to(mask.device)

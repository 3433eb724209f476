"""Components: which tensor(s) of a checkpoint a metric is computed on.

A component turns one checkpoint into ``{layer name: tensor}``. Layer names follow pico-analyze's
output keys (``{prefix}{layer}.{suffix}.{data_type}``), so step JSON files read the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Union

import torch

from analog.checkpoints.loading import DATA_TYPES, Checkpoint

from .base import LowRankProduct
from .registry import register_component

__all__ = ["BaseComponent", "ComponentConfig", "OVCircuitComponent", "SimpleComponent", "find_layer_keys"]


@dataclass(frozen=True)
class ComponentConfig:
    """One ``components`` entry of the YAML config (pico-analyze schema plus a few optional keys)."""

    component_name: str = "simple"
    data_type: str = "weights"
    layer_suffixes: Union[None, str, Tuple[str, ...], Tuple[Tuple[str, str], ...]] = None
    layers: Optional[Tuple[int, ...]] = None
    options: Tuple[Tuple[str, Any], ...] = field(default=())

    def key(self) -> str:
        return repr((self.component_name, self.data_type, self.layer_suffixes, self.layers, self.options))


class BaseComponent:
    """Interface: ``extract(checkpoint, split) -> {layer name: tensor}``.

    ``selects_all`` is true when no layer was named; matrix metrics then skip 1-D tensors (biases,
    norms) instead of failing on them.
    """

    name: ClassVar[str] = "?"
    options: ClassVar[Dict[str, type]] = {}

    def __init__(self, config: ComponentConfig):
        if config.data_type not in DATA_TYPES:
            raise ValueError(f"data_type '{config.data_type}' is not one of {', '.join(DATA_TYPES)}")
        unknown = sorted(set(dict(config.options)) - set(self.options))
        if unknown:
            raise ValueError(f"component '{self.name}': unknown key(s) {', '.join(unknown)}")
        self.config = config

    @property
    def selects_all(self) -> bool:
        return False

    @property
    def label(self) -> str:
        return f"{self.name}:{self.config.data_type}"

    def pools(self, name: str) -> bool:
        """Whether output ``name`` belongs in the whole-model pool (every output by default)."""
        return True

    def extract(self, checkpoint: Checkpoint, split: str) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def extract_data(self, checkpoint: Checkpoint, split: str) -> Dict[str, Union[torch.Tensor, LowRankProduct]]:
        """What the runner measures: :meth:`extract`, except that a component may hand over a matrix as
        a :class:`LowRankProduct` so that spectral metrics see its compact spectrum."""
        return self.extract(checkpoint, split)


def find_layer_keys(keys, suffix: str, layers: Optional[Tuple[int, ...]], where: str) -> Dict[Optional[int], str]:
    """Map layer index -> tensor key for keys ``[prefix.][index.]suffix[.weight]``.

    ``model.layers.3.attention.o_proj.weight`` matches suffix ``attention.o_proj`` at index 3.
    A suffix matching nothing, or a requested index that is absent, is a ``KeyError`` naming it.
    """
    # the prefix is tried last (``??``), so a key without one (``2.weight`` of an nn.Sequential) gives its
    # leading integer to ``idx`` rather than to the prefix
    pattern = re.compile(rf"^(?:(?P<prefix>.*?)\.)??(?:(?P<idx>\d+)\.)?{re.escape(suffix)}(?:\.weight)?$")
    found: Dict[Optional[int], str] = {}
    for key in keys:
        match = pattern.match(key)
        if match:
            idx = int(match.group("idx")) if match.group("idx") is not None else None
            if idx in found and found[idx] != key and found[idx].endswith(".weight"):
                continue
            found[idx] = key
    if not found:
        sample = ", ".join(sorted(keys)[:8])
        raise KeyError(f"layer suffix '{suffix}' matches no tensor in {where}; keys include: {sample}")
    if layers is None:
        return dict(sorted(found.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))
    missing = [i for i in layers if i not in found]
    if missing:
        have = sorted(i for i in found if i is not None)
        raise KeyError(f"layer(s) {missing} with suffix '{suffix}' not found in {where}; layers present: {have}")
    return {i: found[i] for i in layers}


def _where(checkpoint: Checkpoint, data_type: str, split: str) -> str:
    return f"the {data_type} of step {checkpoint.step} ({checkpoint.ref.path}, split '{split}')"


@register_component("simple")
class SimpleComponent(BaseComponent):
    """Tensors chosen by ``layer_suffixes`` (a string or a list) and ``layers`` (indices).

    Without ``layer_suffixes`` every tensor of the chosen ``data_type`` is used (``selects_all``).
    Output names: ``{key without .weight}.{data_type}``.
    """

    def __init__(self, config: ComponentConfig):
        super().__init__(config)
        if config.layer_suffixes is None and config.layers is not None:
            raise ValueError("component 'simple': 'layers' needs 'layer_suffixes'")
        if (
            isinstance(config.layer_suffixes, tuple)
            and config.layer_suffixes
            and isinstance(config.layer_suffixes[0], tuple)
        ):
            raise ValueError("component 'simple': layer_suffixes must be a string or a list of strings")

    @property
    def selects_all(self) -> bool:
        return self.config.layer_suffixes is None

    def extract(self, checkpoint: Checkpoint, split: str) -> Dict[str, torch.Tensor]:
        cfg = self.config
        data = checkpoint.tensors(cfg.data_type, split)
        if cfg.layer_suffixes is None:
            return {f"{k[:-7] if k.endswith('.weight') else k}.{cfg.data_type}": data[k] for k in data}
        suffixes = (cfg.layer_suffixes,) if isinstance(cfg.layer_suffixes, str) else cfg.layer_suffixes
        out: Dict[str, torch.Tensor] = {}
        for suffix in suffixes:
            for key in find_layer_keys(
                list(data), suffix, cfg.layers, _where(checkpoint, cfg.data_type, split)
            ).values():
                out[f"{key[:-7] if key.endswith('.weight') else key}.{cfg.data_type}"] = data[key]
        return out


@register_component("ov_circuit")
class OVCircuitComponent(BaseComponent):
    """The OV circuit of attention layers, per head and for the whole layer; GQA aware.

    Orientation (the same for all data types): ``OV_h = W_O[:, h] @ W_V[g(h)]`` is ``d_model x
    d_model`` and maps a residual vector ``x`` to the head's output ``OV_h x``. ``W_V``
    (``n_kv_heads*head_dim x d_model``) and ``W_O`` (``d_model x n_heads*head_dim``) are in
    ``nn.Linear`` (out, in) layout; ``[:, h]`` / ``[g]`` select the ``head_dim`` columns / rows of
    query head ``h`` and of its key-value group ``g(h) = h // (n_heads / n_kv_heads)``.

    * weights:     ``OV_h``
    * activations: ``A_h = V[:, g(h)] @ W_O[:, h]^T`` (``n x d_model``), i.e. ``X OV_h^T`` for value
      activations ``V = X W_V^T`` (leading dims of ``V`` are flattened into samples)
    * gradients:   ``dOV_h = G_O[:, h] W_V[g(h)] + W_O[:, h] G_V[g(h)]`` (product rule: the change of
      ``OV_h`` along the gradients ``G_O``, ``G_V``)

    The whole layer (``heads: combined``) is ``sum_h`` of the per-head terms (``W_O W_V`` with
    key-value heads repeated). ``heads: per_head | combined | both`` (default both).
    ``n_heads`` / ``n_kv_heads`` come from the component entry or the run's model config.
    """

    options = {"n_heads": int, "n_kv_heads": int, "heads": str}

    def __init__(self, config: ComponentConfig):
        super().__init__(config)
        suffixes = dict(config.layer_suffixes) if isinstance(config.layer_suffixes, tuple) else {}
        if set(suffixes) != {"output_layer", "value_layer"} or any(not isinstance(v, str) for v in suffixes.values()):
            raise ValueError("component 'ov_circuit': layer_suffixes must be {output_layer: ..., value_layer: ...}")
        self.suffixes = suffixes
        opts = dict(config.options)
        self.heads_mode = opts.get("heads", "both")
        if self.heads_mode not in ("per_head", "combined", "both"):
            raise ValueError(f"component 'ov_circuit': heads '{self.heads_mode}' is not per_head, combined or both")
        self.n_heads = opts.get("n_heads")
        self.n_kv_heads = opts.get("n_kv_heads", self.n_heads)

    def set_model_config(self, n_heads: Optional[int], n_kv_heads: Optional[int]) -> None:
        """Fill head counts from the run's model config when the entry does not give them."""
        if self.n_heads is None:
            self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads

    def _layout(self, w_v: torch.Tensor, w_o: torch.Tensor, where: str) -> Tuple[int, int]:
        if self.n_heads is None:
            raise ValueError(f"component 'ov_circuit': n_heads unknown for {where}; set n_heads (and n_kv_heads)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ov_circuit: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if w_v.dim() != 2 or w_o.dim() != 2 or w_v.shape[1] != w_o.shape[0]:
            raise ValueError(
                f"ov_circuit: W_V {tuple(w_v.shape)} reads {w_v.shape[-1]} features but W_O {tuple(w_o.shape)} "
                f"writes {w_o.shape[0]} in {where}: the circuit W_O W_V must map the residual stream (d_model) to "
                "itself, with nn.Linear's (out, in) layout. A fused QKV projection (GPT-2's c_attn, GPT-NeoX's "
                "query_key_value) or a transposed Conv1D layout cannot be used as value_layer/output_layer"
            )
        head_dim, rem = divmod(w_o.shape[1], self.n_heads)
        if rem or w_v.shape[0] != self.n_kv_heads * head_dim:
            raise ValueError(
                f"ov_circuit: shapes W_V {tuple(w_v.shape)}, W_O {tuple(w_o.shape)} do not fit "
                f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} in {where}"
            )
        return head_dim, self.n_heads // self.n_kv_heads

    def extract(self, checkpoint: Checkpoint, split: str) -> Dict[str, torch.Tensor]:
        """The circuits as dense ``d_model x d_model`` (or ``n x d_model``) tensors."""
        return {name: term.product() for name, term in self.extract_data(checkpoint, split).items()}

    def extract_data(self, checkpoint: Checkpoint, split: str) -> Dict[str, LowRankProduct]:
        """The circuits as :class:`LowRankProduct` factors (inner dim ``head_dim`` per head)."""
        cfg = self.config
        weights = checkpoint.tensors("weights", split)
        where = _where(checkpoint, "weights", split)
        o_keys = find_layer_keys(list(weights), self.suffixes["output_layer"], cfg.layers, where)
        v_keys = find_layer_keys(list(weights), self.suffixes["value_layer"], cfg.layers, where)
        data = checkpoint.tensors(cfg.data_type, split) if cfg.data_type != "weights" else weights
        if cfg.data_type != "weights":
            v_data = find_layer_keys(
                list(data), self.suffixes["value_layer"], cfg.layers, _where(checkpoint, cfg.data_type, split)
            )
        out: Dict[str, torch.Tensor] = {}
        for idx, o_key in o_keys.items():
            if idx not in v_keys:
                raise KeyError(f"ov_circuit: layer {idx} has an output but no value projection in {where}")
            w_o, w_v = weights[o_key].double(), weights[v_keys[idx]].double()
            head_dim, group = self._layout(w_v, w_o, where)
            if cfg.data_type == "weights":
                terms = self._weight_terms(w_o, w_v, head_dim, group)
            elif cfg.data_type == "activations":
                terms = self._activation_terms(data[v_data[idx]].double(), w_o, head_dim, group)
            else:
                g_o = data[find_layer_keys(list(data), self.suffixes["output_layer"], (idx,), where)[idx]].double()
                terms = self._gradient_terms(w_o, w_v, g_o, data[v_data[idx]].double(), head_dim, group)
            stem = o_key[:-7] if o_key.endswith(".weight") else o_key
            prefix = stem[: -len(self.suffixes["output_layer"])]
            out.update(self._name(prefix, *terms))
        return out

    def pools(self, name: str) -> bool:
        """With ``heads: both`` only the combined circuits are pooled (the heads sum to them)."""
        return self.heads_mode != "both" or ".heads." not in name

    def _name(self, prefix: str, terms: List[LowRankProduct], combined: LowRankProduct) -> Dict[str, LowRankProduct]:
        base = f"{prefix}ov_circuit.{self.config.data_type}"
        named: Dict[str, LowRankProduct] = {}
        if self.heads_mode in ("per_head", "both"):
            named.update({f"{base}.heads.{h}": t for h, t in enumerate(terms)})
        if self.heads_mode in ("combined", "both"):
            named[base] = combined
        return named

    def _heads(self, w: torch.Tensor, head_dim: int) -> List[torch.Tensor]:
        """The ``head_dim`` columns of each query head: ``W_O[:, h]``."""
        return [w[:, h * head_dim : (h + 1) * head_dim] for h in range(self.n_heads)]

    def _groups(self, w: torch.Tensor, head_dim: int, group: int) -> List[torch.Tensor]:
        """``W_O`` reduced to one block per key-value group: ``sum_{h in g} W_O[:, h]``."""
        heads = self._heads(w, head_dim)
        return [sum(heads[g * group : (g + 1) * group]) for g in range(self.n_heads // group)]

    def _kv(self, w: torch.Tensor, head_dim: int, g: int) -> torch.Tensor:
        """The ``head_dim`` rows of key-value group ``g``: ``W_V[g]``."""
        return w[g * head_dim : (g + 1) * head_dim]

    def _weight_terms(self, w_o, w_v, head_dim, group):
        """``OV_h = W_O[:, h] @ W_V[g(h)]`` (inner dim ``head_dim``); combined ``sum_g W_O'[g] W_V[g]``
        with ``W_O'[g] = sum_{h in g} W_O[:, h]`` (inner dim ``n_kv_heads * head_dim``)."""
        terms = [
            LowRankProduct(o, self._kv(w_v, head_dim, h // group)) for h, o in enumerate(self._heads(w_o, head_dim))
        ]
        combined = LowRankProduct(torch.cat(self._groups(w_o, head_dim, group), 1), w_v)
        return terms, combined

    def _activation_terms(self, v, w_o, head_dim, group):
        """``A_h = V[:, g(h)] @ W_O[:, h]^T``; combined ``V @ W_O'^T``."""
        v = v.reshape(-1, v.shape[-1])
        terms = [
            LowRankProduct(self._kv(v.T, head_dim, h // group).T, o.T) for h, o in enumerate(self._heads(w_o, head_dim))
        ]
        combined = LowRankProduct(v, torch.cat(self._groups(w_o, head_dim, group), 1).T)
        return terms, combined

    def _gradient_terms(self, w_o, w_v, g_o, g_v, head_dim, group):
        """``G_O[:, h] W_V[g] + W_O[:, h] G_V[g] = [G_O[:, h], W_O[:, h]] @ [W_V[g]; G_V[g]]``.

        Inner dim ``2 head_dim`` per head, ``2 n_kv_heads head_dim`` combined."""
        terms = [
            LowRankProduct(
                torch.cat([go, wo], 1),
                torch.cat([self._kv(w_v, head_dim, h // group), self._kv(g_v, head_dim, h // group)]),
            )
            for h, (go, wo) in enumerate(zip(self._heads(g_o, head_dim), self._heads(w_o, head_dim)))
        ]
        left = torch.cat(self._groups(g_o, head_dim, group) + self._groups(w_o, head_dim, group), 1)
        return terms, LowRankProduct(left, torch.cat([w_v, g_v]))

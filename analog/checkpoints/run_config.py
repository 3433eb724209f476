"""Read a run's model config (pico-train ``training_config.yaml`` or Hugging Face ``config.json``).

Both are untrusted input: YAML is read with ``yaml.safe_load`` (a ``!!python/...`` tag is refused,
never executed) and every failure is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import yaml

from .discovery import CheckpointRef
from .loading import CheckpointError

__all__ = ["attention_head_counts", "read_json_file", "read_yaml_file"]


def read_yaml_file(path: Path) -> Any:
    """``yaml.safe_load`` of ``path``; unreadable, malformed or tagged YAML is an error naming the file."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable YAML file ({detail})") from exc


def read_json_file(path: Path) -> Any:
    """``json.loads`` of ``path``; unreadable or malformed JSON is an error naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from exc


def _mapping(value: Any, path: Path, key: str = "") -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        where = f" key '{key}'" if key else ""
        raise CheckpointError(f"{path}:{where} expected a mapping, found {type(value).__name__}")
    return value


def _count(value: Any, path: Path, key: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{path}: '{key}' must be a positive integer, found {value!r}")
    return value


def attention_head_counts(run_path: Path, refs: Sequence[CheckpointRef]) -> Tuple[Optional[int], Optional[int]]:
    """``(n_heads, n_kv_heads)`` from ``run_path/training_config.yaml`` (pico-train: ``model.attention_n_heads``,
    ``model.attention_n_kv_heads``) or from ``config.json`` in ``run_path`` or the first checkpoint folder
    (Hugging Face: ``num_attention_heads``, ``num_key_value_heads``, or the other names in ``HEAD_KEYS`` and
    ``KV_HEAD_KEYS``, such as GPT-2's ``n_head``; under ``text_config`` for a multimodal model);
    ``(None, None)`` when neither exists."""
    run_path = Path(run_path)
    pico = run_path / "training_config.yaml"
    if pico.is_file():
        model = _mapping(_mapping(read_yaml_file(pico), pico).get("model"), pico, "model")
        return (
            _count(model.get("attention_n_heads"), pico, "model.attention_n_heads"),
            _count(model.get("attention_n_kv_heads"), pico, "model.attention_n_kv_heads"),
        )
    for folder in [run_path] + [r.path for r in refs if r.path.is_dir()][:1]:
        hf = folder / "config.json"
        if hf.is_file():
            cfg = _mapping(read_json_file(hf), hf)
            if not any(key in cfg for key in HEAD_KEYS) and isinstance(cfg.get("text_config"), dict):
                cfg = cfg["text_config"]  # a multimodal model: the language model's config
            return _first_count(cfg, HEAD_KEYS, hf), _first_count(cfg, KV_HEAD_KEYS, hf)
    return None, None


#: names Hugging Face configs give the attention head counts (Llama/Mistral/Qwen; GPT-2/BLOOM; MPT-style; T5)
HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads")


def _first_count(cfg: Dict[str, Any], keys: Sequence[str], path: Path) -> Optional[int]:
    """The first of ``keys`` present in ``cfg`` (a positive integer, else an error naming it)."""
    for key in keys:
        if cfg.get(key) is not None:
            return _count(cfg[key], path, key)
    return None

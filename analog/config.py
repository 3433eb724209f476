"""Configuration of an AnaLog run: dataclasses in, dict/YAML in and out, unknown keys refused.

Top-level keys (``AnaLog(config=...)`` or ``analog.update({...})``):

=============  ====================================================================================
root_dir       directory holding one folder per project (default ``./analog_logs``)
log            any of ``"grad"``, ``"forward"``, ``"backward"`` (default ``["grad"]``)
save           write logs to the store on disk (default ``True``)
hessian        ``"none"`` (identity), ``"diagonal"``, ``"kfac"``, ``"ekfac"``, ``"raw"``, or ``"auto"``
               (= ``True``): per module, ``raw`` where the store holds at least as many examples as
               the module logs numbers per example (its k × k second moment is then determined),
               K-FAC elsewhere and without a store (analog.hessian.auto; measured in
               benchmarks/results/attribution_lm.md); ``False`` means ``"none"``
damping        λ added to the curvature: a float, or ``None`` for 0.1 × mean eigenvalue per module
fit_bytes      bytes of float64 sums a curvature fit from the store holds at once (default 1 GiB =
               2**30). ``raw`` sums a k × k block per module (8k² bytes: 128 MiB at LoGra rank 64,
               k = 4096), so modules are fitted in groups whose sums fit, one read of the store per
               group; a module larger than this is fitted alone, with a warning naming it. Not counted:
               the fitted state and one module's eigendecomposition (≈ 3 × 8k² bytes) at a time. Under
               torch.distributed every rank fits with the smallest value any rank was given
compression    ``{type: logra|dense|none, rank: int | [r_out, r_in] | {glob: rank},
               init: random|pca|whiten|whiten_pca|query, seed: int, damping: float|None}`` (default
               LoGra, rank 64, random, seed 0); ``pca``/``whiten``/``whiten_pca`` need a statistics pass
               (AnaLogScheduler); ``query`` also a pass over a sample of queries (the directions their
               whitened gradients occupy are kept: analog.compression.query); ``damping`` is the
               whitening λ (None: 0.1 × mean eigenvalue of S ⊗ A);
               ``allocate: spectrum`` re-divides the configured ranks' budget Σ r_out·r_in among
               modules and sides by the whitened spectra (uniform: as configured)
storage        ``{dtype: auto|float32|float16|bfloat16|int8|int4|int2, flush_bytes: int}``: how the training
               rows are stored. ``auto`` (default): int8 for compressed logs (LoGra, dense), float32
               without compression (``compression.type: none``) or with ``nonfinite: allow`` (int8
               cannot hold NaN/Inf); a project keeps the dtype it was first logged with (state/
               config.json records it resolved). Quantising a sketch to int8 changed no measured score
               (benchmarks/results/attribution_lm.md, runs 6–7) and stores a quarter of the
               bytes. ``int8``: per row and field (one module's one log kind)
               scale = max|x|/127 in float32, q = round(x/scale) ∈ [-127, 127], read back as
               q·scale with |x − x̂| ≤ scale/2 (analog.storage.encoding) — 4F + n bytes per row
               of n values and F fields, so at the bytes of float32 it stores 4× the sketch
               dimension (LoGra rank 32 in int8 ≈ rank 16 in float32). ``int4``: the same with
               scale = max|x|/7, q ∈ [-7, 7], two values a byte — 4F + ⌈n/2⌉ bytes, 8× the
               sketch dimension of float32 at its bytes (LoGra rank 45 in int4, 4 + 1013 bytes a
               module, ≈ rank 16 in float32, 1024), |x − x̂| ≤ scale/2 = max|x|/14. ``int2``: per
               row and field a fixed random rotation y = R x (randomised Hadamard, which makes
               the values Gaussian), σ = RMS of y and four levels (±0.4528σ, ±1.5104σ, the Gaussian
               Lloyd–Max quantiser), read back as Rᵀ ŷ, four values a byte — 4F + ⌈n/4⌉ bytes, 16× the sketch
               dimension of float32 at its bytes (LoGra rank 64 in int2 ≈ rank 16 in float32);
               mean squared error 0.1175σ² on Gaussian values, no per-element bound. Only stored
               training rows are quantised: query gradients, curvature statistics and factors are not.
segments       ``{rule: repeat|manual, checkpoint: bool}``: when a new segment starts (``repeat``: a batch
               with an id already logged in the current segment; ``manual``: only at
               ``new_segment()``), and whether each segment keeps its watched parameters
               (see analog.trajectory.segments)
nonfinite      ``"error"`` (default: raise, naming the module and ids) or ``"allow"``
progress       show tqdm bars (default: only when stderr is a terminal)
=============  ====================================================================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from analog.storage.encoding import STORE_DTYPES

LOG_KINDS = ("grad", "forward", "backward")
HESSIANS = ("none", "diagonal", "kfac", "ekfac", "raw", "auto")
INITS = ("random", "pca", "whiten", "whiten_pca", "query")


@dataclass
class CompressionConfig:
    type: str = "logra"
    rank: Any = 64
    init: str = "random"
    seed: int = 0
    damping: Optional[float] = None
    allocate: str = "uniform"


@dataclass
class StorageConfig:
    dtype: str = "auto"
    flush_bytes: int = 64 * 2**20


@dataclass
class SegmentsConfig:
    rule: str = "repeat"
    checkpoint: bool = False


@dataclass
class Config:
    root_dir: str = "./analog_logs"
    log: List[str] = field(default_factory=lambda: ["grad"])
    save: bool = True
    hessian: str = "none"
    damping: Optional[float] = None
    fit_bytes: int = 2**30
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    segments: SegmentsConfig = field(default_factory=SegmentsConfig)
    nonfinite: str = "error"
    progress: Optional[bool] = None

    def update(self, values: Dict[str, Any]) -> "Config":
        """A new Config with ``values`` merged in (nested sections merge key by key)."""
        if not isinstance(values, dict):
            raise TypeError(f"analog config must be a mapping, not {type(values).__name__}")
        merged = self.to_dict()
        for key, value in values.items():
            if key not in merged:
                raise KeyError(f"unknown analog config key {key!r}; known keys: {sorted(merged)}")
            if isinstance(merged[key], dict) and not isinstance(value, dict):
                raise TypeError(f"config section {key!r} must be a mapping with keys {sorted(merged[key])}, "
                                f"not {value!r}")
            if isinstance(merged[key], dict):
                unknown = set(value) - set(merged[key])
                if unknown:
                    raise KeyError(f"unknown key(s) {sorted(unknown)} in config section {key!r}; "
                                   f"known: {sorted(merged[key])}")
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return Config.from_dict(merged)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "Config":
        values = dict(values)
        if "compression" in values and isinstance(values["compression"], dict):
            values["compression"] = CompressionConfig(**values["compression"])
        if "storage" in values and isinstance(values["storage"], dict):
            values["storage"] = StorageConfig(**values["storage"])
        if "segments" in values and isinstance(values["segments"], dict):
            values["segments"] = SegmentsConfig(**values["segments"])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @property
    def store_dtype(self) -> str:
        """The dtype training rows are stored in: ``storage.dtype``, with ``auto`` resolved — int8 for
        compressed logs, float32 for uncompressed ones and under ``nonfinite: allow`` (an int8 store
        holds finite values only, so storing NaN/Inf as asked needs float32)."""
        if self.storage.dtype != "auto":
            return self.storage.dtype
        return "float32" if self.compression.type == "none" or self.nonfinite == "allow" else "int8"

    def validate(self) -> None:
        if not isinstance(self.root_dir, (str, Path)):
            raise TypeError(f"config 'root_dir' must be a path, not {self.root_dir!r}")
        self.root_dir = str(self.root_dir)
        if not isinstance(self.save, bool):
            raise TypeError(f"config 'save' must be true or false, not {self.save!r}")
        if isinstance(self.log, str):
            self.log = [self.log]
        if not isinstance(self.log, (list, tuple)):
            raise TypeError(f"config 'log' must be a list of kinds from {list(LOG_KINDS)}, not {self.log!r}")
        self.log = list(self.log)
        if not self.log:
            raise ValueError(f"config 'log' is empty: choose at least one of {list(LOG_KINDS)}")
        bad = [k for k in self.log if k not in LOG_KINDS]
        if bad:
            raise ValueError(f"config 'log': unknown kind(s) {bad}; choose from {list(LOG_KINDS)}")
        if self.hessian is True:
            self.hessian = "auto"
        elif self.hessian is False or self.hessian is None:
            self.hessian = "none"
        if self.hessian not in HESSIANS:
            raise ValueError(f"config 'hessian': unknown {self.hessian!r}; choose from {list(HESSIANS)}")
        if self.damping is not None and (isinstance(self.damping, bool) or not isinstance(self.damping, (int, float))
                                         or not self.damping >= 0):
            raise ValueError(f"config 'damping' must be a number >= 0 or None, got {self.damping!r}")
        if isinstance(self.fit_bytes, bool) or not isinstance(self.fit_bytes, (int, float)) \
                or not 1 <= self.fit_bytes < math.inf:
            raise ValueError(f"config 'fit_bytes' must be a positive number of bytes, got {self.fit_bytes!r}")
        self.fit_bytes = int(self.fit_bytes)
        if self.progress is not None and not isinstance(self.progress, bool):
            raise TypeError(f"config 'progress' must be true, false or null, got {self.progress!r}")
        if self.nonfinite not in ("error", "allow"):
            raise ValueError(f"config 'nonfinite' must be 'error' or 'allow', got {self.nonfinite!r}")
        if self.compression.type not in ("logra", "dense", "none"):
            raise ValueError(f"config 'compression.type': unknown {self.compression.type!r}; "
                             "choose from ['logra', 'dense', 'none']")
        c = self.compression
        if c.init not in INITS:
            raise ValueError(f"config 'compression.init': unknown {c.init!r}; choose from {list(INITS)}")
        if c.allocate not in ("uniform", "spectrum"):
            raise ValueError(f"config 'compression.allocate' must be 'uniform' or 'spectrum', got {c.allocate!r}")
        if c.allocate == "spectrum" and (c.type != "logra" or c.init in ("random", "query")):
            raise ValueError("config 'compression.allocate: spectrum' chooses LoGra ranks from a statistics pass: "
                             "use it with type 'logra' and init 'pca', 'whiten' or 'whiten_pca'")
        if c.damping is not None and (isinstance(c.damping, bool) or not isinstance(c.damping, (int, float))
                                      or not c.damping > 0):
            raise ValueError(f"config 'compression.damping' must be a number > 0 or None, got {c.damping!r}")
        if self.compression.type == "dense" and self.hessian in ("kfac", "ekfac", "auto"):
            raise ValueError(f"hessian {self.hessian!r} uses Kronecker factors (K-FAC), which a dense projection "
                             "does not keep; use hessian 'raw', 'diagonal' or 'none' with compression type 'dense'")
        if self.segments.rule not in ("repeat", "manual"):
            raise ValueError(f"config 'segments.rule' must be 'repeat' or 'manual', got {self.segments.rule!r}")
        if not isinstance(self.segments.checkpoint, bool):
            raise TypeError(f"config 'segments.checkpoint' must be true or false, got {self.segments.checkpoint!r}")
        if self.storage.dtype != "auto" and self.storage.dtype not in STORE_DTYPES:
            raise ValueError(f"config 'storage.dtype': unknown {self.storage.dtype!r}; "
                             f"choose from {['auto', *STORE_DTYPES]}")
        flush = self.storage.flush_bytes
        if isinstance(flush, bool) or not isinstance(flush, (int, float)) or not flush >= 1:
            raise ValueError(f"config 'storage.flush_bytes' must be a positive number of bytes, got {flush!r}")
        self.storage.flush_bytes = int(flush)


def load_config(config: Union[None, str, Path, Dict[str, Any], Config]) -> Config:
    """A Config from nothing (defaults), a dict, a Config, or a YAML file path."""
    return Config().update(given_values(config)) if not isinstance(config, Config) else config


def given_values(config: Union[None, str, Path, Dict[str, Any], Config]) -> Dict[str, Any]:
    """The keys the user set: the dict, the YAML file's mapping, or a Config's non-default values."""
    if config is None:
        return {}
    if isinstance(config, Config):
        defaults = Config().to_dict()
        return {k: v for k, v in config.to_dict().items() if v != defaults[k]}
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.exists():
            raise FileNotFoundError(f"analog config file {path} does not exist")
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            raise ValueError(f"analog config file {path} must hold a mapping, not {type(values).__name__}")
        return values
    if isinstance(config, dict):
        return config
    raise TypeError(f"config must be None, a dict or a YAML path, not {type(config).__name__}")

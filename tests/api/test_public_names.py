"""Each product of analog has its own public names; names renamed to get there still work and warn."""

import importlib
import pkgutil
import warnings

import pytest

import analog

PACKAGES = ["analog"] + [f"analog.{m.name}" for m in pkgutil.iter_modules(analog.__path__) if m.ispkg]


def test_no_public_name_means_two_things_across_products():
    owners = {}
    clashes = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")]):
            obj = getattr(module, name)
            if name in owners and owners[name][1] is not obj:
                clashes.append(f"{name}: {owners[name][0]} and {package}")
            owners.setdefault(name, (package, obj))
    assert len(PACKAGES) >= 9 and len(owners) > 60
    assert clashes == []


def test_no_module_constant_means_two_things_across_products():
    """``DTYPES``, ``DATA_TYPES`` and ``ALIASES`` once collided (storage/monitor, metrics/checkpoints, metrics/runs)."""
    owners = {}
    clashes = []
    modules = [m.name for m in pkgutil.walk_packages(analog.__path__, "analog.") if not m.name.endswith("__main__")]
    for name in modules:
        module = importlib.import_module(name)
        product = name.split(".")[1]
        for const, value in vars(module).items():
            if not const.isupper() or const.startswith("_"):
                continue
            first = owners.setdefault(const, (name, product, value))
            if first[1] != product and first[2] is not value:
                clashes.append(f"{const}: {first[0]} and {name}")
    assert len(modules) > 50 and len(owners) > 20
    assert clashes == []


@pytest.mark.parametrize(
    "module, old, new",
    [
        ("analog.metrics", "AnalysisConfig", "MetricsConfig"),
        ("analog.metrics", "load_config", "load_metrics_config"),
        ("analog.metrics", "run_analysis", "run_metrics"),
        ("analog.monitor", "AnalysisConfig", "MonitorConfig"),
    ],
)
def test_old_names_are_deprecated_aliases(module, old, new):
    package = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{module}.{old} is deprecated; use {module}.{new}"):
        alias = getattr(package, old)
    assert alias is getattr(package, new)
    assert old not in package.__all__


def test_from_import_of_old_name_warns_and_new_names_do_not():
    with pytest.warns(DeprecationWarning):
        from analog.monitor import AnalysisConfig  # noqa: F401
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from analog.metrics import MetricsConfig, load_metrics_config, run_metrics  # noqa: F401
        from analog.monitor import ModelAnalysisCallback, MonitorConfig  # noqa: F401
    with pytest.raises(AttributeError, match="analog.monitor.*no_such_name"):
        _ = importlib.import_module("analog.monitor").no_such_name

"""Packaging for analog (distribution name ``analog-ml``; the import name is ``analog``).

The PyPI name ``analog`` belongs to an unrelated log-analysis utility, so the distribution is
published as ``analog-ml``. Install torch for your platform first (see README), then this package.
"""

from setuptools import find_packages, setup

setup(
    name="analog-ml",
    version="0.1.0",
    description="Log per-sample gradients and activations of PyTorch models and analyse them: "
    "influence functions, checkpoint metrics, training monitors and run comparisons.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["analog", "analog.*"]),
    package_data={"analog": ["report/assets/*"]},
    install_requires=[
        "torch>=2.1",
        "numpy",
        "tqdm",
        "pyyaml",
        "safetensors",
    ],
    extras_require={
        "demo": ["scikit-learn"],
        "hf": ["transformers", "accelerate"],
        # the run-log plots (analog.runs); everything else works without matplotlib
        "plot": ["matplotlib"],
        "test": ["pytest", "scikit-learn", "transformers", "accelerate", "ruff", "matplotlib"],
    },
    entry_points={"console_scripts": ["analog=analog.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)

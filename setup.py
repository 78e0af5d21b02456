"""Package layout (everything else is in pyproject.toml).

The repository's ``experiments/`` folder is installed as ``bilevel_experiments``: a
top-level ``experiments`` in site-packages would shadow, or be shadowed by, a user's own
``experiments`` package. From a checkout ``python -m experiments`` still works.
"""

from setuptools import find_packages, setup

EXPERIMENTS = "bilevel_experiments"
experiment_packages = [
    EXPERIMENTS + name[len("experiments") :] for name in find_packages(include=["experiments*"])
]
setup(
    packages=find_packages(include=["bilevel", "bilevel.*"]) + experiment_packages,
    package_dir={EXPERIMENTS: "experiments"},
)

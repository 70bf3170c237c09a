#!/usr/bin/env python
"""Installs the UPSNetRobust detectron2 extension (package: ``upsnet_robust``)."""
from setuptools import find_packages, setup

setup(
    name="upsnet-robust",
    version="0.1.0",
    description="UPSNet for detectron2, with adversarial attacks, defenses and robustness sweeps",
    package_dir={"": "projects/UPSNetRobust"},
    packages=find_packages("projects/UPSNetRobust"),
    python_requires=">=3.8",
    # detectron2 is deliberately not listed: it is installed as `sal-detectron2` by `make install`
    # (requirements/lock.txt) or as the user's own build; both provide the `detectron2` module.
    install_requires=[
        "torch",
        "torchvision",
        "numpy",
        "fvcore",
        "iopath",
        "opencv-python-headless",
        "panopticapi-lite",
        "cityscapesscripts",
        "hydra-core",
        "matplotlib",
        "tqdm",
    ],
)

"""Installable package for glipv2-d2 (GLIPv2 as a Detectron2 project)."""

from setuptools import find_packages, setup

setup(
    name="glipv2-d2",
    version="0.1.0",
    description="GLIPv2 grounded vision-language model as a Detectron2 extension",
    python_requires=">=3.10",
    # The quick start's synthetic data lives with its project, outside the library, and installs beside it.
    packages=[*find_packages(include=["glipv2_d2", "glipv2_d2.*"]), "glipv2_quickstart"],
    package_dir={"glipv2_quickstart": "projects/GLIPv2/glipv2_quickstart"},
    package_data={"glipv2_d2": ["detections.schema.json"]},  # the JSON Schema of the demo outputs
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "transformers>=4.40",
        "timm>=0.9",
        "fvcore",
        "iopath",
        "pycocotools",
        "lvis",
        "yacs",
        "opencv-python-headless",
        "Pillow",
        "safetensors",
        "open-clip-torch>=3.3",
        "pycocoevalcap>=1.2",
    ],
)

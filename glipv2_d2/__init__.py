"""GLIPv2 as a Detectron2 project: importing the package registers every component."""

from . import modeling  # noqa: F401
from .config import add_glipv2_config

__all__ = ["add_glipv2_config"]

"""The delta format and its maths: read, write, validate, extract, apply/restore (torch + safetensors)."""

from .base import Base, bind_base, default_device, load_base, parse_dtype
from .bases import DEFAULT_BASES, resolve_base
from .errors import BaseModelError, DeltaRejected, SwapError
from .extract import extract, load_finetuned
from .format import (
    FORMAT_VERSION,
    DeltaMeta,
    Provenance,
    SparseTensor,
    TaskDelta,
    dumps,
    load,
    loads,
    save,
)
from .swap import PreparedDelta, Swapper, merge_into, prepare
from .synth import random_delta
from .validate import validate

__all__ = [
    "DEFAULT_BASES", "FORMAT_VERSION", "Base", "BaseModelError", "DeltaMeta", "DeltaRejected",
    "PreparedDelta", "Provenance", "SparseTensor", "SwapError", "Swapper", "TaskDelta", "bind_base",
    "default_device", "dumps", "extract", "load", "load_base", "load_finetuned", "loads",
    "merge_into", "parse_dtype", "prepare", "random_delta", "resolve_base", "save", "validate",
]

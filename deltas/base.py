"""The loaded base model: one copy of the weights that every task's delta is swapped into."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .bases import resolve_base
from .errors import BaseModelError
from .fingerprint import fingerprint
from .layout import FlatLayout, consolidate

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise BaseModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}") from None


@dataclass(eq=False)
class Base:
    """A loaded base. `params` are the live tensors a swap writes into, one per tied group."""

    name: str
    path: Path
    model: Any  # a transformers PreTrainedModel, eval mode, no grad
    tokenizer: Any
    fingerprint: str
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> canonical name
    layout: FlatLayout | None = None  # where `params` live: one flat buffer per dtype (swap.py)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def is_causal_lm(self) -> bool:
        return hasattr(self.model, "generate") and self.model.can_generate()

    @property
    def kinds(self) -> tuple[str, ...]:
        """The task kinds this base can serve."""
        return (("classify", "regress", "generate", "embed") if self.is_causal_lm
                else ("classify", "regress", "embed"))

    @cached_property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def backbone(self) -> torch.nn.Module:
        return self.model.base_model

    def canonical(self, name: str) -> str | None:
        """The base tensor a name refers to (tied aliases resolved), or None."""
        if name in self.params:
            return name
        return self.aliases.get(name)


def load_base(name_or_path: str | Path, device: str | None = None,
              dtype: str | torch.dtype = "float32") -> Base:
    """Load a named default or a Hugging Face folder on `device` (cuda if available) in `dtype`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    folder = resolve_base(name_or_path)
    config = transformers.AutoConfig.from_pretrained(folder)
    arch = (config.architectures or [""])[0]
    auto = transformers.AutoModelForCausalLM if arch.endswith("ForCausalLM") else transformers.AutoModel
    try:
        model = auto.from_pretrained(folder, dtype=parse_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot load base from {folder}: {exc}") from exc
    model.to(device or default_device()).eval().requires_grad_(False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs padding; causal LMs often lack it
    return bind_base(model, tokenizer, name=str(name_or_path), path=folder,
                     fingerprint=fingerprint(folder))


def bind_base(model: Any, tokenizer: Any, name: str, path: Path | None, fingerprint: str) -> Base:
    """Wrap an already-built model (tests build tiny ones from a config) as a Base.

    The parameters are moved into one flat buffer per dtype (values unchanged), so that the swap
    can write a whole delta in one call."""
    params = dict(model.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    aliases = {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False)
               if n not in params}
    return Base(name=name, path=Path(path or "."), model=model, tokenizer=tokenizer,
                fingerprint=fingerprint, params=params, aliases=aliases, layout=consolidate(params))

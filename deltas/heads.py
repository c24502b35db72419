"""Task heads: dense modules a task adds on top of the shared backbone (a classifier).

A classify or regress task runs the transformers `AutoModelForSequenceClassification` of the base's
config, built with the *shared* base backbone inside it and the delta's `head::` tensors as its
remaining parameters; its head has one output per label (a regress task: one label, one output).
Its forward is the same code as the offline fine-tuned model's, so outputs match.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

import torch

from .base import Base
from .format import HEAD_KINDS


def classify_config(base: Base, labels: list[str]) -> Any:
    cfg = copy.deepcopy(base.config)
    cfg.num_labels = len(labels)
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {label: i for i, label in enumerate(labels)}
    if getattr(cfg, "pad_token_id", None) is None and base.tokenizer is not None:
        pad = base.tokenizer.pad_token_id
        cfg.pad_token_id = pad if pad is not None else base.tokenizer.eos_token_id
    return cfg


def head_spec(base: Base, kind: str, num_labels: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names -> (shape, dtype) of the head tensors a task of this kind must carry."""
    if kind not in HEAD_KINDS:
        return {}
    return dict(_classify_spec(base, num_labels))


@lru_cache(maxsize=64)
def _classify_spec(base: Base, num_labels: int) -> tuple:
    labels = [str(i) for i in range(num_labels)]
    wrapper = _empty_classifier(base, labels)
    prefix = wrapper.base_model_prefix + "."
    return tuple((n, (tuple(p.shape), p.dtype)) for n, p in wrapper.named_parameters()
                 if not n.startswith(prefix))


def _empty_classifier(base: Base, labels: list[str]) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    cfg = classify_config(base, labels)
    with torch.device("meta"):
        wrapper = AutoModelForSequenceClassification.from_config(cfg, dtype=base.dtype)
    # the shared backbone replaces the wrapper's own (meta) one: same modules, no copy
    setattr(wrapper, wrapper.base_model_prefix, base.backbone)
    return wrapper


@lru_cache(maxsize=64)
def _template(base: Base, labels: tuple[str, ...]) -> torch.nn.Module:
    return _empty_classifier(base, list(labels))


def build_classifier(base: Base, labels: list[str], heads: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A sequence classifier over the live base backbone with the given head tensors."""
    # Building the wrapper from its config constructs a whole (meta) backbone first: tens of ms on
    # a cold task's path. Copy a per-(base, labels) template instead, all but the shared backbone.
    wrapper = copy.deepcopy(_template(base, tuple(labels)), memo={id(base.backbone): base.backbone})
    # Own copies, freshly allocated: a head parsed from a file is a view into its bytes, aligned to
    # its element only, and CPU matmul kernels sum in another order for a weight that is not
    # 16-byte aligned (served outputs then differed from the merged model's in the last bits).
    state = {n: t.to(device=base.device, dtype=base.dtype, copy=True) for n, t in heads.items()}
    missing, unexpected = wrapper.load_state_dict(state, strict=False, assign=True)
    prefix = wrapper.base_model_prefix + "."
    missing = [n for n in missing if not n.startswith(prefix)]
    if missing or unexpected:
        raise ValueError(f"head does not fit: missing {missing}, unexpected {unexpected}")
    return wrapper.eval().requires_grad_(False)

"""PEFT adapters in, merged Hugging Face folders out.

In: a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`, never a pickle).
- SHiRA adapters are sparse already: each module's `shira_indices` ([2, nnz] rows, cols) and
  `shira_weight` become flat indices and increments (times the adapter's scaling), exactly.
- LoRA adapters are merged (ΔW = B·A · alpha/r, or alpha/√r with rsLoRA) and then kept at the
  density the caller chooses, the largest entries first; `kept_energy` says how much of the
  update (its squared norm) the kept entries hold. Other adapter types are merged by PEFT itself
  (`merge_and_unload`, needs the `peft` package) and kept the same way.
- `modules_to_save`: a copy of a base module becomes the difference to it; a module the base
  lacks (a classifier) becomes the delta's dense head.

Out: `export_merged` writes the base with a delta merged in, as a folder `from_pretrained` loads.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .base import Base
from .extract import _select
from .format import HEAD_KINDS, DeltaMeta, Provenance, SparseTensor, TaskDelta

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KINDS = {"SEQ_CLS": "classify", "CAUSAL_LM": "generate", "FEATURE_EXTRACTION": "embed"}


@dataclass(frozen=True)
class Adapter:
    """A PEFT adapter as saved: its config and its tensors (PEFT's names)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    folder: Path

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()


@dataclass(frozen=True)
class Imported:
    delta: TaskDelta
    kept_energy: float  # share of the adapter's squared update norm the kept entries hold


def read_adapter(folder: str | Path) -> Adapter:
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"{folder} is not a PEFT adapter folder (no {CONFIG_FILE})")
    if not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{folder} has no {WEIGHTS_FILE} (only safetensors adapters are read)")
    config = json.loads((folder / CONFIG_FILE).read_text())
    return Adapter(config=config, tensors=load_file(folder / WEIGHTS_FILE), folder=folder)


def import_peft(base: Base, folder: str | Path, density: float | None = None,
                kind: str | None = None, labels: list[str] | None = None) -> Imported:
    """The adapter as a delta for `base`. SHiRA is exact (density ignored); other adapters keep
    round(density × base entries) largest entries, or every nonzero when density is None."""
    adapter = read_adapter(folder)
    saved, heads = modules_to_save(base, adapter)
    if adapter.peft_type == "SHIRA":
        tensors, energy = shira_tensors(base, adapter), 1.0
        tensors = _merge_sparse(tensors, _sparse_all(saved))
    else:
        dense = lora_updates(base, adapter) if _plain_lora(adapter) else merged_updates(base, adapter)
        tensors, energy = sparsify(base, _add(dense, saved), density)
    kind = kind or _kind_of(base, adapter, heads)
    if kind in HEAD_KINDS:
        labels = labels or _default_labels(heads)
    elif heads:
        raise ValueError(f"modules {sorted(heads)} are not in the base; only a classify or regress "
                         "task can carry them (as its head): pass --kind classify or regress")
    nnz = sum(t.nnz for t in tensors.values())
    provenance = Provenance(method="import-peft", density=nnz / base.numel,
                            peft_type=adapter.peft_type, target_density=density,
                            kept_energy=round(energy, 6))
    meta = DeltaMeta(base_fingerprint=base.fingerprint, base_name=base.name, kind=kind,
                     labels=labels or [], provenance=provenance)
    return Imported(TaskDelta(meta=meta, tensors=tensors, heads=heads), energy)


# --- names -----------------------------------------------------------------------------------

def base_tensor(base: Base, name: str) -> str | None:
    """The base tensor a PEFT-side name (prefix stripped) refers to: as is, without the
    fine-tuned wrapper's prefix (`bert.`), or under the base's own prefix."""
    candidates = [name, name.split(".", 1)[-1]]
    prefix = getattr(base.model, "base_model_prefix", "")
    if prefix:
        candidates.append(f"{prefix}.{name}")
    for c in candidates:
        if c in base.params:
            return c
        if c in base.aliases:  # a tied copy (lm_head of a tied embedding): a delta cannot untie it
            raise ValueError(f"{name!r} is tied to {base.aliases[c]!r} in the base; a delta "
                             "cannot change one without the other")
    return None


def _module_groups(adapter: Adapter, suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> {suffix: tensor} for tensors named PREFIX + path + "." + suffix."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in adapter.tensors.items():
        rel = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix in suffixes:
            if rel.endswith("." + suffix):
                groups.setdefault(rel[: -len(suffix) - 1], {})[suffix] = t
    return groups


def _weight_of(base: Base, module: str) -> str:
    name = base_tensor(base, module + ".weight")
    if name is None:
        raise ValueError(f"adapter module {module!r} has no weight in the base {base.name!r}: "
                         "is it an adapter for another model?")
    return name


# --- SHiRA -----------------------------------------------------------------------------------

def shira_tensors(base: Base, adapter: Adapter) -> dict[str, SparseTensor]:
    scaling = float(adapter.config.get("scaling", 1.0))  # PEFT's default; not saved by PEFT
    transposed = bool(adapter.config.get("fan_in_fan_out", False))
    out = {}
    for module, parts in _module_groups(adapter, ("shira_indices", "shira_weight")).items():
        if set(parts) != {"shira_indices", "shira_weight"}:
            raise ValueError(f"SHiRA module {module!r} lacks its indices or its weights")
        name = _weight_of(base, module)
        shape = base.params[name].shape  # [out, in] ([in, out] with fan_in_fan_out)
        rows, cols = parts["shira_indices"].long()
        if transposed:
            rows, cols = cols, rows
        out[name] = _coalesced(rows * shape[1] + cols, parts["shira_weight"].float() * scaling,
                               base.params[name].numel())
    return out


def _coalesced(flat: torch.Tensor, val: torch.Tensor, numel: int) -> SparseTensor:
    """Sorted unique flat indices, repeated ones summed (as PEFT's sparse COO tensor does)."""
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= numel):
        raise ValueError("a SHiRA index is outside its weight matrix")
    uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    summed = torch.zeros(uniq.numel(), dtype=val.dtype).index_add_(0, inverse, val)
    keep = summed != 0
    idx_dtype = torch.int32 if numel < 2**31 else torch.int64
    return SparseTensor(uniq[keep].to(idx_dtype), summed[keep])


# --- LoRA and the rest: dense updates, then the largest entries --------------------------------

def _plain_lora(adapter: Adapter) -> bool:
    c = adapter.config
    return (adapter.peft_type == "LORA" and not c.get("use_dora") and not c.get("lora_bias")
            and not any("lora_embedding" in k or "lora_magnitude" in k for k in adapter.tensors))


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key):
            return value
    return default


def lora_updates(base: Base, adapter: Adapter) -> dict[str, torch.Tensor]:
    """Base name -> ΔW = B·A × scaling, in float32, shaped as the base weight."""
    c = adapter.config
    out = {}
    for module, parts in _module_groups(adapter, ("lora_A.weight", "lora_B.weight")).items():
        r = _pattern(c.get("rank_pattern"), module, c["r"])
        alpha = _pattern(c.get("alpha_pattern"), module, c.get("lora_alpha", r))
        scaling = alpha / (r ** 0.5 if c.get("use_rslora") else r)
        update = parts["lora_B.weight"].float() @ parts["lora_A.weight"].float() * scaling  # [out, in]
        name = _weight_of(base, module)
        out[name] = update.T if c.get("fan_in_fan_out") else update
    return out


@torch.no_grad()
def merged_updates(base: Base, adapter: Adapter) -> dict[str, torch.Tensor]:
    """Any adapter PEFT can merge: load it onto a copy of the base, merge, take the differences."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ValueError(f"{adapter.peft_type} adapters are merged by the peft package: "
                         "pip install peft") from exc
    model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(adapter.folder))
    merged = dict(model.merge_and_unload().named_parameters())
    out = {}
    for name, p in base.params.items():
        diff = merged[name].float() - p.float()
        if diff.any():
            out[name] = diff
    return out


def modules_to_save(base: Base, adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base name -> full replacement's difference, head name -> tensor) of the saved modules."""
    wanted = adapter.config.get("modules_to_save") or []
    diffs, heads = {}, {}
    for key, t in adapter.tensors.items():
        rel = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if not any(rel == m or rel.startswith(m + ".") or f".{m}." in f".{rel}" for m in wanted):
            continue
        if any(s in rel for s in ("lora_", "shira_")):
            continue
        name = base_tensor(base, rel)
        if name is None:
            heads[rel] = t.contiguous()
        else:
            diffs[name] = t.float() - base.params[name].detach().float().cpu()
    return diffs, heads


def sparsify(base: Base, dense: dict[str, torch.Tensor], density: float | None
             ) -> tuple[dict[str, SparseTensor], float]:
    """The largest round(density × base entries) entries of the updates (every nonzero when
    density is None), and the share of the updates' squared norm they hold."""
    flat = {n: d.reshape(-1) for n, d in dense.items()}
    if density is None:
        keep = {n: torch.nonzero(d).reshape(-1) for n, d in flat.items()}
    else:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        keep = _select(flat, base, density, "global") if flat else {}
    total = sum(float(d.double().square().sum()) for d in flat.values())
    kept = sum(float(flat[n][i].double().square().sum()) for n, i in keep.items())
    tensors = {}
    for n in sorted(keep):
        if keep[n].numel():
            idx = keep[n].to(torch.int32 if flat[n].numel() < 2**31 else torch.int64)
            tensors[n] = SparseTensor(idx, flat[n][keep[n]].float())
    return tensors, (kept / total if total else 1.0)


def _sparse_all(dense: dict[str, torch.Tensor]) -> dict[str, SparseTensor]:
    out = {}
    for n, d in dense.items():
        idx = torch.nonzero(d.reshape(-1)).reshape(-1)
        out[n] = SparseTensor(idx.to(torch.int32 if d.numel() < 2**31 else torch.int64),
                              d.reshape(-1)[idx])
    return out


def _merge_sparse(a: dict[str, SparseTensor], b: dict[str, SparseTensor]) -> dict[str, SparseTensor]:
    out = dict(a)
    for n, t in b.items():
        if n in out:
            raise ValueError(f"{n!r} is both an adapter target and a saved module")
        out[n] = t
    return out


def _add(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(a)
    for n, t in b.items():
        out[n] = out[n] + t if n in out else t
    return out


def _kind_of(base: Base, adapter: Adapter, heads: dict[str, torch.Tensor]) -> str:
    task_type = adapter.config.get("task_type")
    if task_type == "SEQ_CLS" and _head_width(heads) == 1:
        return "regress"  # one output: transformers' regression (num_labels=1)
    if task_type in KINDS:
        return KINDS[task_type]
    return "generate" if base.is_causal_lm else "embed"


def _default_labels(heads: dict[str, torch.Tensor]) -> list[str]:
    """LABEL_0.. as transformers names them, one per row of the head's last weight."""
    width = _head_width(heads)
    if width is None:
        raise ValueError("a classify or regress task needs its head in modules_to_save (the "
                         "classifier)")
    return [f"LABEL_{i}" for i in range(width)]


def _head_width(heads: dict[str, torch.Tensor]) -> int | None:
    """Outputs of the head: rows of its last weight matrix (None: no head)."""
    weights = [t for n, t in heads.items() if n.endswith("weight") and t.dim() == 2]
    return int(weights[-1].shape[0]) if weights else None


# --- out: a merged Hugging Face folder --------------------------------------------------------

@torch.no_grad()
def export_merged(base: Base, delta: TaskDelta, folder: str | Path) -> Path:
    """Write the base with `delta` merged in as a Hugging Face folder (safetensors, config,
    tokenizer). Merges into `base` itself: pass a base loaded for this purpose."""
    from .heads import build_classifier
    from .swap import merge_into, prepare

    folder = Path(folder)
    prepared = prepare(delta, base)
    merge_into(base.params, prepared)
    model = base.model
    if delta.meta.kind in HEAD_KINDS:
        model = build_classifier(base, delta.meta.labels, delta.heads)
    model.save_pretrained(folder)
    if base.tokenizer is not None:
        base.tokenizer.save_pretrained(folder)
    return folder

"""Mixed-task batches: one forward of the untouched base serves rows of several tasks.

The swap is exact but serves one task per forward. Here the base weights stay as they are and each
task's delta corrects the outputs of the modules it touches, for that task's rows only (the rows
of one task are contiguous in the batch):

    Linear     y += x @ ΔWᵀ + Δb          (ΔW: the delta's sorted flat indices, read as rows)
    Embedding  y += ΔE[ids]              (ΔE's rows for all the batch's ids at once)
    LayerNorm  y += norm(x) * Δγ + Δβ    (norm: layer_norm without its affine part)
    RMSNorm    y += norm(x) * Δγ         (norm: x / rms(x) in float32, cast as the module casts)

A tensor used by several modules (a causal LM's embedding tied to its LM head) corrects every use:
the embedding lookup (y += ΔE[ids]) and the output projection (logits += h @ ΔEᵀ). A delta on any
other tensor, a base of a type not listed in `HOOKED`, or a task head that cannot run on the shared
backbone's output makes the task not mixable: it runs through the swap. The outputs equal the
merged model's up to rounding only (x·W + x·ΔW is not x·(W+ΔW) bit for bit). Inputs are
[batch, ...]: [batch, seq] ids, [batch, seq, hidden] activations (prefill: seq > 1, decode: 1).
A forward given `inputs_embeds` instead of ids skips the embedding and so its correction.

`Mixer` registers forward hooks on the modules once; they return at once unless a `mixing(...)`
context is active, so single-task forwards compute exactly what they did. The corrections run on
one of two paths (`_mixed_paths`), chosen once at construction: the compiled CPU kernels of
`_mixed_kernel` (float32; one call per module for all tasks, reading the delta's own index and
increment runs: no extra memory), or torch sparse CSR ops (any device, CUDA included; a CSR kept
per delta, counted in its `MixedDelta.nbytes`, which the server's cache adds to the task's entry).
The mixing forms and a batch's plans (per module, its tasks' arguments) are in `_mixed_forms`;
a batch's plans are kept while the next batches have the same rows and tasks, as consecutive
decode steps do.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import _mixed_kernel
from ._mixed_forms import (
    EmbeddingFix,
    Fix,
    LinearFix,
    MixedDelta,
    NormFix,
    Segments,
    SparseMatrix,
    cover,
    merge_neighbours,
    negate,
    plan_modules,
)
from ._mixed_paths import Batch, KernelPath, TorchPath
from .base import Base
from .format import HEAD_KINDS
from .swap import PreparedDelta

__all__ = ["EmbeddingFix", "Fix", "LinearFix", "MixedDelta", "Mixer", "NormFix", "SparseMatrix",
           "module_kind", "pooled_logits"]

MIXABLE_KINDS = ("classify", "regress", "embed", "generate")
# model type -> the part of the model whose modules get hooks: an encoder's backbone (the heads
# run on its output), a causal LM's whole model (its LM head is outside the backbone). Mistral and
# Qwen2 (q/k/v biases) are Llama's modules under other names; each one listed is tested
HOOKED = {"bert": "backbone", "llama": "model", "mistral": "model", "qwen2": "model"}
# encoders whose modules see batch-first inputs and whose classifier runs on the pooled output:
# BertForSequenceClassification is pooler_output -> dropout -> classifier
POOLED_HEADS = {"bert": "BertForSequenceClassification"}

def module_kind(module: nn.Module) -> str | None:
    """"linear", "embedding" or "norm" for the modules the mixer can correct, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.LayerNorm) or _is_rms_norm(module):
        return "norm"
    return None


def _is_rms_norm(module: nn.Module) -> bool:
    # LlamaRMSNorm and its copies (weight * (x / rms(x))); not Gemma's (1 + weight) variant,
    # which keeps its epsilon as `eps`
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


class Mixer:
    """Output corrections for several tasks in one forward of a base. One worker thread drives
    `cached`, `build` and `mixing`; `why_not` is meant for one other thread (the event loop)."""

    def __init__(self, base: Base) -> None:
        self.base = base
        self.model_type = getattr(base.config, "model_type", "")
        self._modules: dict[str, nn.Module] = {}
        # base tensor name -> its uses: (module name, "weight"|"bias"), two for a tied tensor
        self._targets = self._find_targets()
        self._built: weakref.WeakKeyDictionary[PreparedDelta, MixedDelta] = weakref.WeakKeyDictionary()
        self._verdicts: weakref.WeakKeyDictionary[PreparedDelta, str | None] = (
            weakref.WeakKeyDictionary())
        self._layers: tuple[Batch, ...] = ()  # inside a mixing context: 1, or 2 against a swap
        self._last: tuple[tuple, tuple[Batch, ...]] | None = None  # the last batch's plans
        self._negated: tuple[MixedDelta, MixedDelta] | None = None  # the swapped task's -Δ
        # built (or loaded) now, at startup, not on the first mixed batch
        kernel = (_mixed_kernel.load() if self._targets and base.device.type == "cpu"
                  and base.dtype == torch.float32 else None)
        self._path = KernelPath(kernel) if kernel is not None else TorchPath()
        self._runs: dict[str, Callable] = {name: getattr(self._path, module_kind(m) or "")
                                           for name, m in self._modules.items()}
        self._handles = [m.register_forward_hook(_Hook(self, name))
                         for name, m in self._modules.items()]

    @property
    def _kernel(self) -> Any:
        """The compiled kernels this mixer runs, None on the torch path."""
        return self._path.kernel if isinstance(self._path, KernelPath) else None

    @_kernel.setter
    def _kernel(self, kernel: Any) -> None:  # benchmarks wrap the kernels in timers
        if isinstance(self._path, KernelPath):
            self._path.kernel = kernel

    def _find_targets(self) -> dict[str, list[tuple[str, str]]]:
        root = getattr(self.base, HOOKED.get(self.model_type, ""), None)
        if root is None:
            return {}
        prefix = next(n for n, m in self.base.model.named_modules() if m is root)
        prefix = f"{prefix}." if prefix else ""
        uses: dict[str, list[tuple[str, str, nn.Module]]] = {}
        for sub, module in root.named_modules():
            for attr, _ in module.named_parameters(recurse=False):
                canonical = self.base.canonical(f"{prefix}{sub}.{attr}")
                if canonical is not None:
                    uses.setdefault(canonical, []).append((prefix + sub, attr, module))
        targets: dict[str, list[tuple[str, str]]] = {}
        for canonical, found in uses.items():
            # every use must be correctable (a tied tensor read by a module the mixer cannot
            # correct is left to the swap), and an embedding's only parameter is its weight
            if all(module_kind(m) is not None and (module_kind(m) != "embedding" or a == "weight")
                   for _, a, m in found):
                targets[canonical] = [(name, attr) for name, attr, _ in found]
                self._modules.update({name: m for name, _, m in found})
        return targets

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- which deltas can be mixed ---------------------------------------------------------------

    def why_not(self, delta: PreparedDelta) -> str | None:
        """None if the delta can run in a mixed batch, else the reason it cannot (remembered while
        the delta lives; call it from one thread)."""
        if delta not in self._verdicts:
            self._verdicts[delta] = self._why_not(delta)
        return self._verdicts[delta]

    def _why_not(self, delta: PreparedDelta) -> str | None:
        if not self._targets:
            return f"mixed batches do not support {self.model_type!r} bases"
        if self.base.dtype != torch.float32:  # torch's sparse CSR products: float32 on CPU
            return f"mixed batches need a float32 base, not {self.base.dtype}"
        if delta.kind not in MIXABLE_KINDS:
            return f"a {delta.kind!r} task cannot be mixed"
        head = type(delta.head).__name__
        if delta.kind in HEAD_KINDS and head != POOLED_HEADS.get(self.model_type):
            return f"head {head} cannot run on the shared backbone output"
        for name in delta.names:
            if name not in self._targets:
                return (f"tensor {name!r} is not a Linear, Embedding, LayerNorm or RMSNorm "
                        "weight the mixer corrects")
        return None

    # -- building the corrections ----------------------------------------------------------------

    def cached(self, delta: PreparedDelta) -> MixedDelta | None:
        return self._built.get(delta)

    @torch.no_grad()
    def build(self, delta: PreparedDelta) -> MixedDelta:
        """The delta's corrections (kept while the delta lives); it must be mixable."""
        why = self._why_not(delta)
        if why is not None:
            raise ValueError(f"delta {delta.name!r} cannot be mixed: {why}")
        parts: dict[str, dict[str, Any]] = {}  # module name -> attr -> its part of the delta
        made: list[SparseMatrix | torch.Tensor] = []  # once per tensor, however many uses
        for name, idx, inc in zip(delta.names, delta.idx, delta.inc, strict=True):
            made.append(self._part(name, idx, inc))
            for module_name, attr in self._targets[name]:
                parts.setdefault(module_name, {})[attr] = made[-1]
        fixes: dict[str, Fix] = {}
        for module_name, got in parts.items():
            w, b = got.get("weight"), got.get("bias")
            kind = module_kind(self._modules[module_name])
            fixes[module_name] = (EmbeddingFix(w) if kind == "embedding" else
                                  LinearFix(w, b) if kind == "linear" else NormFix(w, b))
        if self._kernel is None:  # the torch path's CSR: built now, counted in the bytes
            for t in made:
                _ = t.csr if isinstance(t, SparseMatrix) else None
        mixed = MixedDelta(name=delta.name, fixes=fixes, nbytes=sum(t.nbytes for t in made))
        self._built[delta] = mixed
        return mixed

    def _part(self, name: str, idx: torch.Tensor, inc: torch.Tensor) -> SparseMatrix | torch.Tensor:
        param = self.base.params[name]
        if param.dim() == 2:
            return SparseMatrix(idx.contiguous(), inc.contiguous(), tuple(param.shape))
        dense = torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
        dense[idx.long()] = inc
        return dense.view(param.shape)

    # -- running a mixed forward -----------------------------------------------------------------

    @contextmanager
    def mixing(self, segments: Segments, rows: int,
               swapped: MixedDelta | None = None) -> Iterator[None]:
        """Inside: forwards of `rows` rows apply each segment's corrections to its rows
        [start, end) (segments in order, not overlapping; a None delta is the base).

        `swapped`: the task whose delta is swapped into the base weights now (the Swapper). Its
        rows get no correction; every other row, base rows included, gets -Δ(swapped) as well as
        its own Δ: a batch mostly of one task can run with that task swapped in."""
        tiles = cover(segments, rows)
        key = (rows, id(swapped), *((a, b, id(m)) for a, b, m in tiles))
        if self._last is None or self._last[0] != key:  # a decode step like the last: same plans
            layers = [tiles]
            if swapped is not None:
                minus = self._minus(swapped)
                layers = [[(a, b, None if m is swapped else minus) for a, b, m in tiles],
                          [(a, b, None if m is swapped else m) for a, b, m in tiles]]
            self._last = (key, tuple(self._layer(merge_neighbours(t), rows) for t in layers))
        self._layers = self._last[1]
        try:
            yield
        finally:
            self._layers = ()

    def _layer(self, tiles: Segments, rows: int) -> Batch:
        counts = torch.tensor([b - a for a, b, _ in tiles], device=self.base.device)
        return Batch(tiles, rows, counts, plan_modules(tiles))

    def _minus(self, mixed: MixedDelta) -> MixedDelta:
        """-Δ of the swapped-in task (kept while it stays the one swapped in: its increments'
        bytes, the index runs and the torch path's CSR shared with `mixed`)."""
        if self._negated is None or self._negated[0] is not mixed:
            self._negated = (mixed, negate(mixed))
        return self._negated[1]

    def forget_batch(self) -> None:
        """Drop the remembered plans of the last batch (they hold its tasks' corrections)."""
        self._last = None
        self._negated = None

    def _hook(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        if not self._layers:
            return None
        plans = [(layer, layer.plans[name]) for layer in self._layers if name in layer.plans]
        if not plans:
            return None
        x, rows = args[0], self._layers[0].rows
        if output.shape[0] != rows:  # shared across rows ([1, seq] position ids): per row now
            if output.shape[0] != 1:
                raise RuntimeError(f"{name}: {output.shape[0]} output rows in a batch of {rows}")
            output = output.expand(rows, *output.shape[1:]).contiguous()
            x = x.expand(rows, *x.shape[1:])
        for layer, plan in plans:
            self._runs[name](layer, plan, module, x, output)
        return output


class _Hook:
    """A module's forward hook. A deep copy of the module shares it (a copied model is not the
    mixer's base; outside a mixing context the hook does nothing anyway)."""

    def __init__(self, mixer: Mixer, name: str) -> None:
        self.mixer, self.name = mixer, name

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        return self.mixer._hook(self.name, module, args, output)

    def __deepcopy__(self, memo: dict) -> _Hook:
        return self


def pooled_logits(head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """A pooled-output classifier head on its rows of the shared backbone's pooled output (a
    regress task's head: one output)."""
    return head.classifier(head.dropout(pooled))  # [rows, labels]

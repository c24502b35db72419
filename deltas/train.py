"""Sparse fine-tuning: train only the masked entries of the base, write the result as a delta.

`SparseTaskModel` keeps the base weights frozen and shared. Each masked base tensor gets one 1-D
values parameter (float32, [k]); the forward pass runs the task model through
`torch.func.functional_call` with `base.index_add(idx, values)` in place of that tensor. Gradients
and optimizer state therefore exist for the masked entries (and the dense head) only, weight decay
can only ever touch the masked entries, and the delta written is the values after the last
optimizer step: a swap computes `base + values` at the same indices, so the served task is the
trained one.

`FullTaskModel` is ordinary full fine-tuning on a private copy (the reference a delta is measured
against, and what `extract` takes entries from).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.func import functional_call

from .base import Base
from .data import IGNORE, batches, n_batches
from .format import HEAD_KINDS, DeltaMeta, Provenance, SparseTensor, TaskDelta
from .heads import build_classifier, head_spec
from .masks import GradScores, Mask, accumulate_grads, update_mask

TRAINABLE_KINDS = ("classify", "regress", "generate")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-3  # the sparse values (SIFT-style sparse training wants a large one); full: 5e-5
    lr_1d: float | None = None  # sparse values in 1-D tensors (biases, norms); None: lr
    head_lr: float = 1e-3  # the dense, freshly initialised head
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 32
    max_length: int = 128
    warmup: float = 0.06  # fraction of the steps with a linear warm-up, then linear decay to 0
    weight_decay: float = 0.0  # on the masked values (toward the base) and head matrices only
    clip: float = 1.0
    dropout: bool = True  # train with the model's dropout
    seed: int = 0


@dataclass(frozen=True)
class Step:
    """A progress event: `done` of `total` in `phase` (scoring, training, evaluating)."""

    phase: str
    done: int
    total: int
    loss: float | None = None


Progress = Callable[[Step], None]


@dataclass
class Trained:
    model: SparseTaskModel | FullTaskModel
    steps: int
    losses: list[float]
    optimizer: torch.optim.Optimizer = field(repr=False)

    @property
    def train_loss(self) -> float:
        """Mean loss over the last quarter of the steps."""
        tail = self.losses[-max(1, len(self.losses) // 4):]
        return sum(tail) / len(tail) if tail else math.nan


# ---- the task network over the shared base ------------------------------------------------------

def task_net(base: Base, kind: str, labels: Sequence[str], heads: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The module a task runs: a classifier (or regressor) over the shared backbone, or the base
    causal LM."""
    if kind in HEAD_KINDS:
        return build_classifier(base, list(labels), heads)
    if kind == "generate":
        if not base.is_causal_lm:
            raise ValueError(f"base {base.name!r} is not a causal LM: it cannot train a generate task")
        return base.model
    raise ValueError(f"training a {kind!r} task is not supported (kinds: {', '.join(TRAINABLE_KINDS)})")


def init_head(base: Base, kind: str, labels: Sequence[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """A fresh head as transformers initialises one: normal(0, initializer_range) matrices, zero biases."""
    std = float(getattr(base.config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype) in sorted(head_spec(base, kind, len(labels)).items()):
        t = torch.randn(shape, generator=gen) * std if len(shape) > 1 else torch.zeros(shape)
        out[name] = t.to(dtype)
    return out


def task_tensors(base: Base, kind: str) -> dict[str, torch.Tensor]:
    """The base tensors a task of this kind runs through (a classifier skips an LM head)."""
    if kind == "generate":
        return dict(base.params)
    used = {id(p) for p in base.backbone.parameters()}
    return {n: p for n, p in base.params.items() if id(p) in used}


def _names_in(net: torch.nn.Module, base: Base) -> dict[str, str]:
    """Base tensor name -> its name inside `net` (matched by identity: the net shares the base)."""
    by_id: dict[int, str] = {}
    for n, p in net.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), n)
    return {b: by_id[id(p)] for b, p in base.params.items() if id(p) in by_id}


def _inputs(batch: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    # a classifier gets its labels separately; a causal LM computes its own shifted loss
    return {k: v for k, v in batch.items() if kind == "generate" or k != "labels"}


def _loss(out: Any, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "classify":
        return torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"])
    if kind == "regress":  # the head's one output against the float target
        return torch.nn.functional.mse_loss(out.logits.float()[:, 0], batch["labels"].float())
    return out.loss


class SparseTaskModel:
    """Frozen base + one trainable [k] float32 values tensor per masked base tensor + a dense head."""

    def __init__(self, base: Base, kind: str, labels: Sequence[str], mask: Mask,
                 values: dict[str, torch.Tensor] | None = None,
                 heads: dict[str, torch.Tensor] | None = None, seed: int = 0) -> None:
        self.base, self.kind, self.labels = base, kind, list(labels)
        heads = heads if heads is not None else init_head(base, kind, labels, seed)
        self.net = task_net(base, kind, labels, {n: h.detach().clone() for n, h in heads.items()})
        shared = {id(p) for p in base.params.values()}
        self.head = {n: p.requires_grad_(True) for n, p in self.net.named_parameters() if id(p) not in shared}
        self._where = _names_in(self.net, base)
        outside = sorted(set(mask) - set(self._where))
        if outside:
            raise ValueError(f"mask names tensors a {kind!r} task does not use: {outside[:3]}")
        self.names = [n for n in sorted(mask) if mask[n].numel()]
        device = base.device
        self.idx = [mask[n].to(device=device, dtype=torch.int64) for n in self.names]
        self.values = [torch.nn.Parameter(
            values[n].detach().to(device=device, dtype=torch.float32).clone() if values is not None
            else torch.zeros(i.numel(), device=device)) for n, i in zip(self.names, self.idx, strict=True)]
        for n, i, v in zip(self.names, self.idx, self.values, strict=True):
            if v.shape != i.shape:
                raise ValueError(f"{n}: {v.numel()} initial values for {i.numel()} masked entries")

    @property
    def nnz(self) -> int:
        return sum(i.numel() for i in self.idx)

    def weights(self) -> dict[str, torch.Tensor]:
        """The masked tensors with the values added, keyed by their names inside the net."""
        out = {}
        for name, idx, val in zip(self.names, self.idx, self.values, strict=True):
            w = self.base.params[name]
            # same arithmetic as a swap: base + increment, computed in the base dtype
            out[self._where[name]] = w.detach().reshape(-1).index_add(0, idx, val.to(w.dtype)).view(w.shape)
        return out

    def __call__(self, **inputs: torch.Tensor) -> Any:
        return functional_call(self.net, self.weights(), args=(), kwargs=inputs)

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        matrices = [p for p in self.head.values() if p.dim() > 1]
        others = [p for p in self.head.values() if p.dim() <= 1]
        one_d = [self.base.params[n].dim() == 1 for n in self.names]
        lr_1d = cfg.lr if cfg.lr_1d is None else cfg.lr_1d
        groups = [{"params": [v for v, f in zip(self.values, one_d, strict=True) if not f], "lr": cfg.lr,
                   "weight_decay": cfg.weight_decay},
                  {"params": [v for v, f in zip(self.values, one_d, strict=True) if f], "lr": lr_1d,
                   "weight_decay": cfg.weight_decay},
                  {"params": matrices, "lr": cfg.head_lr, "weight_decay": cfg.weight_decay},
                  {"params": others, "lr": cfg.head_lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def train(self, mode: bool) -> None:
        self.net.train(mode)

    def to_delta(self, method: str, **provenance: Any) -> TaskDelta:
        """The delta of the current values: exactly the mask, values in the base dtype."""
        tensors = {}
        for name, idx, val in zip(self.names, self.idx, self.values, strict=True):
            target = self.base.params[name]
            itype = torch.int32 if target.numel() < 2**31 else torch.int64
            tensors[name] = SparseTensor(idx.to(itype).cpu(), val.detach().to(target.dtype).cpu().clone())
        meta = DeltaMeta(base_fingerprint=self.base.fingerprint, base_name=self.base.name, kind=self.kind,
                         labels=self.labels if self.kind in HEAD_KINDS else [],
                         provenance=Provenance(method=method, density=self.nnz / self.base.numel,
                                               **provenance))
        heads = {n: p.detach().cpu().clone() for n, p in self.head.items()}
        return TaskDelta(meta=meta, tensors=tensors, heads=heads)


class FullTaskModel:
    """Full fine-tuning on a private copy of the task network (the base itself is never written)."""

    def __init__(self, base: Base, kind: str, labels: Sequence[str],
                 heads: dict[str, torch.Tensor] | None = None, seed: int = 0) -> None:
        self.base, self.kind, self.labels = base, kind, list(labels)
        heads = heads if heads is not None else init_head(base, kind, labels, seed)
        shared_net = task_net(base, kind, labels, {n: h.detach().clone() for n, h in heads.items()})
        body = set(_names_in(shared_net, base).values())
        self.net = copy.deepcopy(shared_net).requires_grad_(True)
        self.head = {n: p for n, p in self.net.named_parameters() if n not in body}
        self.body = {n: p for n, p in self.net.named_parameters() if n in body}

    def __call__(self, **inputs: torch.Tensor) -> Any:
        return self.net(**inputs)

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        head = list(self.head.values())
        decay = [p for p in self.body.values() if p.dim() > 1]
        no_decay = [p for p in self.body.values() if p.dim() <= 1]
        return [g for g in ({"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
                            {"params": head, "lr": cfg.head_lr, "weight_decay": 0.0}) if g["params"]]

    def train(self, mode: bool) -> None:
        self.net.train(mode)


# ---- mask scores, the training loop, evaluation -------------------------------------------------

def gradient_scores(base: Base, kind: str, labels: Sequence[str], features: Sequence[dict],
                    cfg: TrainConfig, num_batches: int = 16, progress: Progress | None = None,
                    heads: dict[str, torch.Tensor] | None = None) -> GradScores:
    """Dense gradients of the loss over the first `num_batches` training batches (base weights,
    `heads` or a fresh head, no dropout), summed as |g| and g^2 per entry."""
    heads = heads if heads is not None else init_head(base, kind, labels, cfg.seed)
    net = task_net(base, kind, labels, {n: h.detach().clone() for n, h in heads.items()})
    where = {n: w for n, w in _names_in(net, base).items() if n in task_tensors(base, kind)}
    leaves = {n: base.params[n].detach().requires_grad_(True) for n in where}  # shares storage
    total = min(num_batches, n_batches(len(features), cfg.batch_size))

    def grads():
        for i, batch in enumerate(batches(features, cfg.batch_size, seed=cfg.seed, pad_id=_pad_id(base))):
            if i >= total:
                return
            out = functional_call(net, {where[n]: t for n, t in leaves.items()}, args=(),
                                  kwargs=_inputs(batch, kind))
            loss = _loss(out, batch, kind)
            g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            if progress:
                progress(Step("scoring", i + 1, total, float(loss.detach())))
            yield {n: (t if t is not None else torch.zeros_like(leaves[n]))
                   for n, t in zip(leaves, g, strict=True)}

    return accumulate_grads(grads())


def fit(model: SparseTaskModel | FullTaskModel, features: Sequence[dict], cfg: TrainConfig,
        progress: Progress | None = None) -> Trained:
    """AdamW with linear warm-up and decay, gradient clipping, seeded order and dropout."""
    if not features:
        raise ValueError("no training examples")
    groups = model.param_groups(cfg)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    per_epoch = n_batches(len(features), cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch
    warm = max(1, round(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    losses: list[float] = []
    pad = _pad_id(model.base)
    with torch.random.fork_rng(devices=[]):  # seeded dropout without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model.train(cfg.dropout)
        try:
            epoch = 0
            while len(losses) < total:
                for batch in batches(features, cfg.batch_size, seed=cfg.seed + epoch, pad_id=pad):
                    loss = _loss(model(**_inputs(batch, model.kind)), batch, model.kind)
                    loss.backward()
                    if cfg.clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
                    if progress:
                        progress(Step("training", len(losses), total, losses[-1]))
                    if len(losses) >= total:
                        break
                epoch += 1
        finally:
            model.train(False)
    return Trained(model=model, steps=len(losses), losses=losses, optimizer=opt)


@torch.no_grad()
def evaluate(model: SparseTaskModel | FullTaskModel, features: Sequence[dict], batch_size: int = 64,
             progress: Progress | None = None) -> dict[str, float]:
    """classify: accuracy and mean loss; regress: Pearson, Spearman and mean squared error (loss);
    generate: mean loss per response token and perplexity."""
    if model.kind == "regress":
        return _evaluate_regress(model, features, batch_size, progress)
    model.train(False)
    total, loss_sum, correct, count = n_batches(len(features), batch_size), 0.0, 0, 0
    for i, batch in enumerate(batches(features, batch_size, pad_id=_pad_id(model.base))):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()
        if model.kind == "classify":
            loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            count += int(batch["labels"].numel())
        else:
            s, c = causal_nll(logits, batch["labels"])
            loss_sum, count = loss_sum + s, count + c
        if progress:
            progress(Step("evaluating", i + 1, total))
    if model.kind == "classify":
        return {"accuracy": correct / max(1, count), "loss": loss_sum / max(1, count)}
    mean = loss_sum / max(1, count)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def _evaluate_regress(model: SparseTaskModel | FullTaskModel, features: Sequence[dict], batch_size: int,
                      progress: Progress | None) -> dict[str, float]:
    model.train(False)
    preds: list[float] = []
    total = n_batches(len(features), batch_size)
    for i, batch in enumerate(batches(features, batch_size, pad_id=_pad_id(model.base))):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        preds += model(**inputs).logits.float()[:, 0].tolist()
        if progress:
            progress(Step("evaluating", i + 1, total))
    return regression_metrics(preds, [float(f["labels"]) for f in features])


def regression_metrics(preds: Sequence[float], targets: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation (STS-B's metrics) and the mean squared error ("loss")."""
    p, t = torch.tensor(preds, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64)
    return {"pearson": _pearson(p, t), "spearman": _pearson(_ranks(p), _ranks(t)),
            "loss": float(((p - t) ** 2).mean()) if len(p) else math.nan}


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom else math.nan  # a constant: undefined


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks from 0, ties given the mean of their positions (as Spearman's rho needs)."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # first position of each distinct value, sorted
    mean = first.double() + (counts.double() - 1) / 2
    return mean[inverse]


def causal_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed NLL, token count) of next-token prediction where labels are not IGNORE."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])  # [batch * (seq-1), vocab]
    target = labels[:, 1:].reshape(-1)
    nll = torch.nn.functional.cross_entropy(pred.float(), target, ignore_index=IGNORE, reduction="sum")
    return float(nll), int((target != IGNORE).sum())


def train_sparse(base: Base, kind: str, labels: Sequence[str], features: Sequence[dict], mask: Mask,
                 cfg: TrainConfig, progress: Progress | None = None,
                 heads: dict[str, torch.Tensor] | None = None) -> Trained:
    """Train the masked entries and the head (`heads`, e.g. from `probe_head`, or a fresh one)."""
    return fit(SparseTaskModel(base, kind, labels, mask, heads=heads, seed=cfg.seed), features, cfg,
               progress)


def probe_head(base: Base, kind: str, labels: Sequence[str], features: Sequence[dict], cfg: TrainConfig,
               steps: int, lr: float, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """A linear probe: `steps` steps training only a fresh head on the frozen base (at `lr`).

    A fresh head is random, so the backbone gradients a mask is scored from point wherever it
    happens to point; after a probe they point at the task. Backward stops at the head, so a probe
    step costs about a forward pass. A generate task has no head: nothing to probe."""
    model = SparseTaskModel(base, kind, labels, {}, seed=cfg.seed)
    if not model.head:
        return {}
    fit(model, features, replace(cfg, max_steps=steps, head_lr=lr), progress)
    return {n: p.detach().clone() for n, p in model.head.items()}


def refit(base: Base, delta: TaskDelta, features: Sequence[dict], cfg: TrainConfig,
          progress: Progress | None = None) -> Trained:
    """Fine-tune an existing delta's entries (its mask fixed) and its head, starting from its values."""
    mask = {n: t.idx.long() for n, t in delta.tensors.items()}
    values = {n: t.val for n, t in delta.tensors.items()}
    model = SparseTaskModel(base, delta.meta.kind, delta.meta.labels, mask, values=values,
                            heads=dict(delta.heads), seed=cfg.seed)
    return fit(model, features, cfg, progress)


@dataclass(frozen=True)
class DenseExtract:
    """Diff pruning's route at the cost of one fine-tune: `dense_fraction` of the steps train every
    entry (at `dense_lr`), then the largest |w - w0| at `density` become the mask and the rest of
    the steps train only those entries, starting from the dense phase's values there (not zero)."""

    density: float = 0.01
    dense_fraction: float = 0.25
    dense_lr: float = 1e-4
    always_1d: bool = True  # biases and LayerNorm weights always in (out of the same budget)
    block: int | None = None  # runs of this many entries along a row instead of single entries


def split_steps(total: int, dense_fraction: float) -> tuple[int, int]:
    """(dense steps, sparse steps) of `total`: at least one of each."""
    if total < 2:
        raise ValueError(f"the dense-then-sparse recipe needs at least 2 steps, got {total}")
    dense = min(total - 1, max(1, round(dense_fraction * total)))
    return dense, total - dense


def dense_updates(base: Base, model: FullTaskModel) -> dict[str, torch.Tensor]:
    """w - w0 of every base tensor a fine-tuned copy changed (in float32, the base's shapes)."""
    where = _names_in(task_net(base, model.kind, model.labels, dict(model.head)), base)
    body = dict(model.net.named_parameters())
    return {b: (body[n].detach().float() - base.params[b].detach().float())
            for b, n in where.items() if n in body}


def train_dense_extract(base: Base, kind: str, labels: Sequence[str], features: Sequence[dict],
                        cfg: TrainConfig, recipe: DenseExtract = DenseExtract(),
                        progress: Progress | None = None) -> Trained:
    """`recipe`'s dense phase, mask and sparse phase; `cfg.lr` is the sparse phase's learning rate
    and `cfg.max_steps` (or epochs) the total of both phases. The result's `steps` is that total."""
    per_epoch = n_batches(len(features), cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch
    n_dense, n_sparse = split_steps(total, recipe.dense_fraction)
    full = fit(FullTaskModel(base, kind, labels, seed=cfg.seed), features,
               replace(cfg, lr=recipe.dense_lr, max_steps=n_dense), progress)
    updates = dense_updates(base, full.model)
    heads = {n: p.detach().clone() for n, p in full.model.head.items()}
    del full
    always = [n for n, u in updates.items() if u.dim() == 1] if recipe.always_1d else []
    mask = update_mask(updates, recipe.density * base.numel / sum(u.numel() for u in updates.values())
                       if updates else recipe.density, always=always, block=recipe.block)
    mask = {n: i for n, i in mask.items() if i.numel()}
    values = {n: updates[n].reshape(-1)[i.to(updates[n].device)] for n, i in mask.items()}
    del updates
    model = SparseTaskModel(base, kind, labels, mask, values=values, heads=heads, seed=cfg.seed)
    # the sparse phase's data order continues where the dense phase stopped
    trained = fit(model, features, replace(cfg, max_steps=n_sparse, seed=cfg.seed + 1), progress)
    trained.steps = total
    return trained


def train_full(base: Base, kind: str, labels: Sequence[str], features: Sequence[dict], cfg: TrainConfig,
               progress: Progress | None = None) -> Trained:
    return fit(FullTaskModel(base, kind, labels, seed=cfg.seed), features, cfg, progress)


def _pad_id(base: Base) -> int:
    tok = base.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else 0)

"""Helpers shared by test modules (imported as `support`: the root conftest puts tests/ on sys.path).

Test modules import helpers from here, never from one another (STYLE.md)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from taskdelta.deltas import merge_into, prepare
from taskdelta.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

KEYS = {"acme": "key-acme", "beta": "key-beta"}


def settings_for(redis_url: str, tmp_path, **over) -> Settings:
    """Server settings for a test: two tenants (KEYS), an admin key, quick batching and re-checks."""
    base = dict(redis_url=redis_url, data_dir=tmp_path / "data", max_wait_ms=2.0,
                api_keys=",".join(f"{t}:{k}" for t, k in KEYS.items()), admin_key="key-admin",
                version_check_s=0.2)
    return Settings(**(base | over))


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def snapshot(base) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in base.params.items()}


def assert_bit_identical(base, saved) -> None:
    for n, p in base.params.items():
        assert torch.equal(p.view(torch.int32), saved[n].view(torch.int32)), n


def merged_copy(base, delta):
    """The offline merged model: a deep copy of the base with the delta added in."""
    clone = copy.copy(base)
    clone.model = copy.deepcopy(base.model)
    clone.params = dict(clone.model.named_parameters())
    clone.__dict__.pop("numel", None)
    prepared = prepare(delta, clone)
    merge_into(clone.params, prepared)
    return clone, prepared

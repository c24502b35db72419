"""Every metrics label takes its values from a bounded set, whatever clients send, and /metrics can
be put behind a key (issue 14, item 6)."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest
from support import auth, settings_for

from taskdelta.server.app import create_app
from taskdelta.server.metrics import METHODS

METRICS_KEY = "sk-metrics-1c9e"


@pytest.fixture
def served(tiny_bert, redis_proc, tmp_path, live_server):
    s = settings_for(redis_proc.url, tmp_path, metrics_key=METRICS_KEY)
    with live_server(create_app(s, base=tiny_bert)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        yield c


def label_values(text: str, label: str) -> set[str]:
    return set(re.findall(rf'{label}="([^"]*)"', text))


def scrape(c: httpx.Client) -> str:
    r = c.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert r.status_code == 200, r.text
    return r.text


def test_client_chosen_methods_and_paths_do_not_become_label_values(served):
    """50 made-up methods and 50 random paths: the method label stays within the known methods
    plus "other", the route label within the app's route templates plus "unmatched". Before, each
    method name became a new series (a client grew /metrics to 982 MB)."""
    c = served
    for _ in range(50):
        c.request(f"X{uuid.uuid4().hex[:12].upper()}", "/v1/tasks", headers=auth("acme"))
        c.get(f"/v1/tasks/{uuid.uuid4().hex}", headers=auth("acme"))
        c.get(f"/{uuid.uuid4().hex}/{uuid.uuid4().hex}")
    text = scrape(c)
    assert label_values(text, "method") <= METHODS | {"other"}
    assert "other" in label_values(text, "method")
    routes = label_values(text, "route")
    assert "/v1/tasks/{task}" in routes and "unmatched" in routes
    assert all("{" in r or r == "unmatched" or not re.search(r"[0-9a-f]{32}", r) for r in routes)
    assert len(routes) < 40, routes
    assert label_values(text, "status") <= {str(s) for s in range(100, 600)} | {"other"}


def test_metrics_behind_a_key(served):
    c = served
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/metrics", headers=auth("acme")).status_code == 401  # a tenant key is not it
    assert "taskdelta_http_request_seconds" in scrape(c)

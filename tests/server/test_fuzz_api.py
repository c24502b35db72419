"""API fuzzing: schemathesis against the server's own OpenAPI schema, stateless and stateful.

The app runs in this process (uvicorn in a thread, the tiny BERT base, a real redis-server, auth
on with one tenant key, which schemathesis knows as the schema's bearer scheme). Every response
goes through all of schemathesis' default checks: no 5xx, a documented status, the documented
content type, headers and body schema, schema-valid data accepted, schema-violating data (a bad
key included) rejected, auth not ignored; the stateful run adds resource availability after a
create and use-after-delete. Seeds are fixed, so a failure replays.

An upload's body is `application/octet-stream`: no schema can say which bytes are a valid delta,
so positive cases of `PUT /v1/tasks/{task}` carry real deltas (drawn by hypothesis from a few
made for the base), negative ones carry schemathesis' arbitrary bytes.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup

from taskdelta.deltas import dumps, random_delta
from taskdelta.server.app import create_app
from taskdelta.server.settings import Settings

pytestmark = pytest.mark.slow

KEY = "fuzz-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SEED = 20240508
CASES = 90  # per operation and generation mode; small spaces (GET /healthz) run out sooner
PINNED = 25  # per operation and known task name, positive cases
KNOWN = ("cls", "emb", "base")  # pinned path names: two uploaded tasks and the base
STATEFUL_RUNS, STATEFUL_STEPS = 70, 12
CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    "auth": {"openapi": {"HTTPBearer": {"bearer": KEY}}},
    # 400 is the server saying a task exists but cannot do what was asked (an encoder base cannot
    # generate, `base` has no classifier, a classify task cannot embed): like a 404 it depends on
    # what is stored, which no request schema can express. Everything else is the default.
    "checks": {"positive_data_acceptance": {
        "expected-statuses": ["2XX", 400, 401, 403, 404, 409, 429]}},
})
FUZZ = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


@dataclass
class Tally:
    """Cases run, statuses seen, and every distinct check failure (collected, asserted at the end)."""

    cases: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: collections.Counter = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)

    def validate(self, case, call) -> None:
        self.cases += 1
        try:
            response = call()
        except FailureGroup as exc:
            for failure in exc.exceptions:
                key = f"{case.operation.label}: {getattr(failure, 'title', type(failure).__name__)}"
                if key not in self.failures:
                    self.examples.append(f"{key}\n{str(exc)[:2000]}")
                self.failures[key] += 1
            return
        self.statuses[response.status_code] += 1

    def report(self) -> str:
        return (f"{self.cases} cases, statuses {dict(sorted(self.statuses.items()))}, "
                f"failures {dict(self.failures)}\n" + "\n\n".join(self.examples[:20]))


@pytest.fixture
def served(tiny_bert, redis_proc, tmp_path, live_server):
    """(schema, upload-body variants, a client) for the app running on a live loopback server."""
    s = Settings(redis_url=redis_proc.url, data_dir=tmp_path / "data", api_keys=f"fuzz:{KEY}",
                 max_delta_bytes=1024 * 1024, request_timeout_s=30.0)
    variants = [dumps(random_delta(tiny_bert, 0.001, seed=i, kind=kind, labels=labels))
                for i, (kind, labels) in enumerate([("classify", ["a", "b"]), ("embed", None),
                                                     ("classify", ["x", "y", "z"]), ("embed", None)])]
    with live_server(create_app(s, base=tiny_bert)) as srv, \
            httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as client:
        schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json", config=CONFIG)
        yield schema, variants, client


def upload_known(client: httpx.Client, variants: list[bytes]) -> None:
    for name, body in (("cls", variants[0]), ("emb", variants[1])):
        assert client.put(f"/v1/tasks/{name}", content=body).status_code in (200, 201)


def fuzz_operation(op, mode, name, variants, tally: Tally, session) -> None:
    """One operation in one generation mode, its {task} optionally pinned to `name`."""
    strategy = op.as_strategy(generation_mode=mode, path_parameters={"task": name} if name else None)
    real_deltas = op.method.upper() == "PUT" and mode is GenerationMode.POSITIVE

    @seed(SEED)
    @settings(max_examples=PINNED if name else CASES, **FUZZ)
    @given(case=strategy, pick=st.integers(0, len(variants) - 1))
    def fuzz(case, pick):
        if real_deltas:
            case.body = variants[pick]
        tally.validate(case, lambda: case.call_and_validate(session=session))

    try:
        fuzz()
    except Unsatisfiable:  # no parameter to negate (GET /healthz)
        assert mode is GenerationMode.NEGATIVE, op.label


def test_stateless_fuzz_finds_no_server_error_or_schema_violation(served):
    schema, variants, client = served
    tally, session = Tally(), requests.Session()
    started = time.perf_counter()
    for result in schema.get_all_operations():
        op = result.ok()
        upload_known(client, variants)  # a DELETE run may have removed them
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(op, mode, None, variants, tally, session)
        if "{task}" in op.path:
            for name in KNOWN:
                fuzz_operation(op, GenerationMode.POSITIVE, name, variants, tally, session)
    print(f"\nschemathesis stateless: {tally.report()} in {time.perf_counter() - started:.0f} s")
    assert not tally.failures, tally.report()
    assert tally.cases >= 1500, tally.report()  # with the stateful run's >= 500: >= 2,000 in all
    # the run reached the served paths, not only the refusals
    assert {200, 201, 401, 404, 422} <= set(tally.statuses), tally.report()
    assert max(tally.statuses) < 500


def test_stateful_fuzz_finds_no_server_error_or_schema_violation(served):
    """Links inferred from the schema: PUT a task, then GET / classify / embed / generate /
    DELETE it. Checks include that a created task is there and a deleted one is gone."""
    schema, variants, client = served
    tally = Tally()
    # the task routes only: schemathesis starts its scenarios from "reliable" roots (a POST, or a
    # GET without path parameters that has links) whenever one exists, and only else from the
    # rest; GET /v1/models (linked to GET /v1/models/{model}) is such a root, and with it in the
    # schema no scenario ever began with the PUT that creates a task (the stateless run covers it)
    tasks = schema.include(path_regex=r"^/v1/tasks/")

    class Machine(tasks.as_state_machine()):
        def setup(self) -> None:
            # every scenario starts from no tasks, so a PUT answers 201 (and feeds its links)
            # whatever the scenarios before it left behind
            for task in client.get("/v1/tasks").json()["tasks"]:
                assert client.delete(f"/v1/tasks/{task['name']}").status_code == 200

        def before_call(self, case) -> None:
            if case.operation.method.upper() == "PUT" and \
                    case.meta.generation.mode is GenerationMode.POSITIVE:
                case.body = variants[len(case.path_parameters["task"]) % len(variants)]

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            tally.validate(case, lambda: super(Machine, self).validate_response(
                response, case, additional_checks, **kwargs) or response)

    started = time.perf_counter()
    seed(SEED)(Machine)
    Machine.run(settings=settings(max_examples=STATEFUL_RUNS, stateful_step_count=STATEFUL_STEPS,
                                  **FUZZ))
    print(f"\nschemathesis stateful: {tally.report()} in {time.perf_counter() - started:.0f} s")
    assert not tally.failures, tally.report()
    assert tally.cases >= 500, tally.report()
    assert {200, 201} <= set(tally.statuses), tally.report()

"""Scale-out as local processes, the topology of docker-compose's `scale` profile: one Redis, two
server replicas (`python -m taskdelta.server`), nginx with the repository's load-balancer template
and compose's upstream parameters. Also: a replica that never hears change messages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from support import classify_delta, wait_until
from support_topology import COMPOSE, NginxProcess, ServerProcess, nginx_binary, upstreams_for

from taskdelta.deltas import dumps, load_base
from taskdelta.server.app import create_app
from taskdelta.server.keys import Keys
from taskdelta.server.settings import Settings

pytestmark = pytest.mark.slow
KEY = {"Authorization": "Bearer key-acme"}
REPLICA_ENV = {"TASKDELTA_API_KEYS": "acme:key-acme",
               # long, so that a replica that shows a change in time heard it by pub/sub
               "TASKDELTA_VERSION_CHECK_S": "600"}
CHANGE_DEADLINE_S = 30  # a hang guard for "within the bound", not a latency claim
UPSTREAM = "x-taskdelta-upstream"  # nginx: the replica(s) it passed the request to


def labels_of(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return set(response.json()["results"][0]["scores"])


@pytest.fixture
def replicas(redis_proc, tiny_bert_dir: Path, tmp_path: Path) -> Iterator[dict[str, ServerProcess]]:
    """The compose services `server` and `server-2` as local processes, started together."""
    started = {name: ServerProcess(name, tiny_bert_dir, redis_proc.url, tmp_path, REPLICA_ENV)
               for name in ("server", "server-2")}
    try:
        for replica in started.values():
            replica.wait_ready()
        yield started
    finally:
        for replica in started.values():
            replica.stop()


@pytest.fixture
def lb(replicas: dict[str, ServerProcess], tmp_path: Path) -> Iterator[NginxProcess]:
    compose = yaml.safe_load(COMPOSE.read_text())
    upstreams = upstreams_for(compose["services"]["lb"]["environment"]["LB_UPSTREAMS"],
                              {name: r.addr for name, r in replicas.items()})
    nginx = NginxProcess(tmp_path / "nginx", upstreams)
    yield nginx
    nginx.stop()


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (.ci/run installs it)")
def test_scale_topology_sticky_consistent_and_surviving_a_replica_kill(
        tiny_bert, replicas, lb) -> None:
    """Through nginx each task sticks to one replica; a change made through one replica reaches
    the other; a replica killed under load costs no request."""
    by_addr = {r.addr: name for name, r in replicas.items()}
    names = [f"task{i}" for i in range(16)]
    with httpx.Client(base_url=lb.url, headers=KEY, timeout=60) as c:
        home: dict[str, str] = {}
        for i, name in enumerate(names):
            r = c.put(f"/v1/tasks/{name}", content=dumps(classify_delta(tiny_bert, i, ("a", "b"))))
            assert r.status_code == 201, r.text
            home[name] = r.headers[UPSTREAM]
        # every request of a task goes where its upload went; the tasks use both replicas
        for name in names:
            for _ in range(3):
                r = c.post(f"/v1/tasks/{name}/classify", json={"texts": ["hello"]})
                assert r.status_code == 200, r.text
                assert r.headers[UPSTREAM] == home[name], name
        assert set(home.values()) == set(by_addr)
        # routes without a task in the path (OpenAI-compatible, listings) go round-robin
        seen = {c.get("/v1/tasks").headers[UPSTREAM] for _ in range(4)}
        assert seen == set(by_addr)

    _check_changes_reach_the_other_replica(tiny_bert, replicas["server"], replicas["server-2"])

    # kill the replica that serves `victim_task` while requests for it keep coming
    victim_task = names[0]
    victim = replicas[by_addr[home[victim_task]]]
    survivor = next(r for r in replicas.values() if r is not victim)
    statuses, served_after, failed_after = asyncio.run(_load_with_kill(lb.url, victim_task, victim))
    # SIGKILL cuts requests in flight on the victim; nginx retries them on the survivor, so no
    # request gets an error status. Only an answer that had begun to reach the client when the
    # kill landed cannot be retried (nginx relays unbuffered): its connection is cut, at most one
    # per client. Every request sent after the kill is answered, by the survivor.
    assert {k for k in statuses if isinstance(k, int)} == {200}, statuses
    cut = {k: n for k, n in statuses.items() if not isinstance(k, int)}
    assert set(cut) <= {"RemoteProtocolError", "ReadError"} and sum(cut.values()) <= 4, statuses
    assert not failed_after, failed_after
    assert served_after and all(u.split(", ")[-1] == survivor.addr for u in served_after)


def _check_changes_reach_the_other_replica(tiny_bert, a: ServerProcess, b: ServerProcess) -> None:
    """An upload and a delete through A, straight to A, are served (404) by B. The replicas run
    with TASKDELTA_VERSION_CHECK_S=600: B showing the change within the deadline can only come
    from the pub/sub invalidation."""
    v1 = dumps(classify_delta(tiny_bert, 1, ("old-a", "old-b")))
    v2 = dumps(classify_delta(tiny_bert, 2, ("new-a", "new-b")))
    with (httpx.Client(base_url=a.url, headers=KEY, timeout=60) as ca,
          httpx.Client(base_url=b.url, headers=KEY, timeout=60) as cb):
        assert ca.put("/v1/tasks/t", content=v1).status_code == 201
        assert labels_of(cb.post("/v1/tasks/t/classify", json={"texts": ["x"]})) == {"old-a", "old-b"}
        assert ca.put("/v1/tasks/t", content=v2).status_code == 200
        wait_until(lambda: labels_of(cb.post("/v1/tasks/t/classify", json={"texts": ["x"]}))
                   == {"new-a", "new-b"}, CHANGE_DEADLINE_S, "B to serve A's new version")
        assert ca.delete("/v1/tasks/t").status_code == 200
        wait_until(lambda: cb.post("/v1/tasks/t/classify", json={"texts": ["x"]}).status_code == 404,
                   CHANGE_DEADLINE_S, "B to answer 404 after A's delete")


async def _load_with_kill(url: str, task: str, victim: ServerProcess,
                          workers: int = 4, before: int = 40,
                          after: int = 60) -> tuple[Counter, list[str], list[str]]:
    """Requests for `task` from `workers` concurrent clients through nginx; SIGKILL `victim`
    once `before` have been answered, stop `after` answers later. Statuses of all (an exception's
    name where no answer came), the upstreams of the answers to requests sent after the kill, and
    what went wrong with those sent after it."""
    statuses: Counter = Counter()
    served_after: list[str] = []
    failed_after: list[str] = []
    killed_at: list[int] = []
    deadline = time.monotonic() + 120

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            done = sum(statuses.values())
            if killed_at and done >= killed_at[0] + after:
                return
            sent_after_kill = bool(killed_at)
            try:
                r = await client.post(f"/v1/tasks/{task}/classify", json={"texts": ["hello"]})
                statuses[r.status_code] += 1
                if sent_after_kill and r.status_code == 200:
                    served_after.append(r.headers[UPSTREAM])
                elif sent_after_kill:
                    failed_after.append(str(r.status_code))
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
                if sent_after_kill:
                    failed_after.append(type(exc).__name__)

    async def killer() -> None:
        while sum(statuses.values()) < before:
            assert time.monotonic() < deadline, "the load never got going"
            await asyncio.sleep(0.01)
        await asyncio.to_thread(victim.kill)
        killed_at.append(sum(statuses.values()))

    async with httpx.AsyncClient(base_url=url, headers=KEY, timeout=60) as client:
        await asyncio.gather(killer(), *(worker(client) for _ in range(workers)))
    assert killed_at and sum(statuses.values()) >= killed_at[0] + after, "load stopped early"
    return statuses, served_after, failed_after


def test_replica_that_hears_no_change_messages_is_stale_at_most_version_check_s(
        tiny_bert, tiny_bert_dir, redis_proc, tmp_path, live_server, caplog) -> None:
    """Replica `deaf` connects as a Redis user that may not subscribe to the change channel
    (a Redis ACL), so it never hears a change message: the version re-check alone must bring
    it to the new version, and to 404, within TASKDELTA_VERSION_CHECK_S."""
    raw = redis.Redis.from_url(redis_proc.url)
    raw.execute_command("ACL", "SETUSER", "deaf", "on", ">deaf-pw", "~*", "resetchannels", "+@all")
    deaf_url = redis_proc.url.replace("redis://", "redis://deaf:deaf-pw@")
    common = dict(api_keys="acme:key-acme")
    writer = create_app(Settings(redis_url=redis_proc.url, data_dir=tmp_path / "w",
                                 version_check_s=600, **common), base=tiny_bert)
    deaf = create_app(Settings(redis_url=deaf_url, data_dir=tmp_path / "d", version_check_s=1.0,
                               **common), base=load_base(tiny_bert_dir, device="cpu"))
    v1 = dumps(classify_delta(tiny_bert, 1, ("old-a", "old-b")))
    v2 = dumps(classify_delta(tiny_bert, 2, ("new-a", "new-b")))
    caplog.set_level(logging.WARNING, logger="taskdelta.server")
    with live_server(writer) as w, live_server(deaf) as d:
        cw = httpx.Client(base_url=w.url, headers=KEY, timeout=60)
        cd = httpx.Client(base_url=d.url, headers=KEY, timeout=60)

        def deaf_labels() -> set[str]:
            return labels_of(cd.post("/v1/tasks/t/classify", json={"texts": ["x"]}))

        assert cw.put("/v1/tasks/t", content=v1).status_code == 201
        assert deaf_labels() == {"old-a", "old-b"}
        # the deaf replica's SUBSCRIBE was refused; only the writer listens
        wait_until(lambda: any("change feed lost" in r.getMessage() for r in caplog.records),
                   CHANGE_DEADLINE_S, "the deaf replica's refused subscription")
        assert raw.pubsub_numsub(Keys().channel())[0][1] == 1
        assert cw.put("/v1/tasks/t", content=v2).status_code == 200
        wait_until(lambda: deaf_labels() == {"new-a", "new-b"}, CHANGE_DEADLINE_S,
                   "the deaf replica to re-check the version")
        assert cw.delete("/v1/tasks/t").status_code == 200
        wait_until(lambda: cd.post("/v1/tasks/t/classify", json={"texts": ["x"]}).status_code == 404,
                   CHANGE_DEADLINE_S, "the deaf replica to answer 404")
        cw.close()
        cd.close()
    raw.close()

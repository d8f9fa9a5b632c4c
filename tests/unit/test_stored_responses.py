"""Stored responses (router/stored_responses.py) against two fake workers that store them as
vLLM does: a follow-up that names one, its retrieval and its cancel reach the worker that
holds it, whatever the policy would pick; ids the router did not see are found by asking
the workers; another tenant's response is not found."""

from __future__ import annotations

import json
import socket
import uuid

import aiohttp

from kvroute.benchmarks.backends.mock import SEEN, STORED, fake_worker
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from kvroute.router.stored_responses import SharedRecords
from tests.governance.conftest import PATIENT, worker_url

ASK = {"model": "m", "input": "what is a KV cache?", "max_output_tokens": 5}


def two_workers(urls: list[str], **top):
    """Round robin: without affinity, every other follow-up would reach the wrong worker."""
    return config_from_dict({"models": [{"name": "m", "workers": urls, "policy": "round_robin"}],
                             "health": {"interval_s": 60}, **top})


async def workers(aiohttp_server) -> tuple[list, list[str]]:
    servers = [await aiohttp_server(fake_worker(n)) for n in ("w1", "w2")]
    return servers, [worker_url(s) for s in servers]


async def test_a_conversation_stays_on_the_worker_that_stores_it(aiohttp_client, aiohttp_server):
    _, urls = await workers(aiohttp_server)
    client = await aiohttp_client(create_app(two_workers(urls)))
    first = await client.post("/v1/responses", json=ASK)
    holder, previous = first.headers["x-kvroute-worker"], (await first.json())["id"]
    for turn in range(4):  # whole and streamed follow-ups, each naming the one before
        resp = await client.post("/v1/responses", json={**ASK, "previous_response_id": previous,
                                                        "stream": turn % 2 == 1})
        assert resp.status == 200 and resp.headers["x-kvroute-worker"] == holder
        assert resp.headers["x-kvroute-predicted-cached-tokens"] == "0"  # the router sees only the new input
        if turn % 2:
            text = (await resp.read()).decode()
            created = text.split("\n\n")[0].split("data: ", 1)[1]
            previous = json.loads(created)["response"]["id"]  # remembered from response.created
        else:
            previous = (await resp.json())["id"]
    got = await client.get(f"/v1/responses/{previous}")
    assert got.status == 200 and (await got.json())["id"] == previous and got.headers["x-kvroute-worker"] == holder
    replay = await client.get(f"/v1/responses/{previous}", params={"stream": "true"})
    assert replay.headers["content-type"].startswith("text/event-stream")
    assert [e.split("\n", 1)[0] for e in (await replay.text()).split("\n\n") if e] == [
        "event: response.created", "event: response.completed"]  # relayed as the worker sent them
    cancel = await client.post(f"/v1/responses/{previous}/cancel")  # the worker's own answer, passed on
    assert cancel.status == 400 and (await cancel.json())["error"]["message"] == "Cannot cancel a synchronous response."
    other = await client.post("/v1/responses", json=ASK)  # without previous_response_id: the policy picks
    assert other.headers["x-kvroute-worker"] != holder


async def test_an_id_made_elsewhere_is_found_by_asking_the_workers(aiohttp_client, aiohttp_server):
    """A response made through another replica (here, straight at the worker) or before a
    restart: the workers are asked, and the one that answers holds it."""
    servers, urls = await workers(aiohttp_server)
    client = await aiohttp_client(create_app(two_workers(urls)))
    async with aiohttp.ClientSession() as session, session.post(f"{urls[1]}/v1/responses",
                                                                json={**ASK, "model": "m"}) as resp:
        made = (await resp.json())["id"]
    got = await client.get(f"/v1/responses/{made}")
    assert got.status == 200 and got.headers["x-kvroute-worker"] == urls[1]
    for _ in range(2):
        follow = await client.post("/v1/responses", json={**ASK, "previous_response_id": made})
        assert follow.status == 200 and follow.headers["x-kvroute-worker"] == urls[1]
    asked = [x for x in servers[0].app[SEEN] if x.get("method") == "GET"]
    assert len(asked) == 1  # asked once, then remembered
    page = (await (await client.get("/metrics")).read()).decode()
    assert 'kvroute_stored_response_lookups_total{result="asked"} 1.0' in page
    assert 'kvroute_stored_response_lookups_total{result="recorded"} 2.0' in page


async def test_unknown_unstored_and_malformed_ids(aiohttp_client, aiohttp_server):
    servers, urls = await workers(aiohttp_server)
    client = await aiohttp_client(create_app(two_workers(urls)))
    missing = await client.post("/v1/responses", json={**ASK, "previous_response_id": "resp_nowhere"})
    error = (await missing.json())["error"]
    assert missing.status == 404 and error["param"] == "previous_response_id" and "resp_nowhere" in error["message"]
    assert (await client.get("/v1/responses/resp_nowhere")).status == 404
    for server in servers:  # asked once: an id no worker held is not asked for again at once
        assert [x["path"] for x in server.app[SEEN] if x.get("method") == "GET"] == ["/v1/responses/resp_nowhere"]
    page = (await (await client.get("/metrics")).read()).decode()
    assert 'kvroute_stored_response_lookups_total{result="missing"} 2.0' in page
    unstored = await client.post("/v1/responses", json={**ASK, "store": False})
    follow = await client.post("/v1/responses", json={**ASK, "previous_response_id": (await unstored.json())["id"]})
    assert follow.status == 404  # store: false keeps nothing, on the worker or in the router
    bad = await client.post("/v1/responses", json={**ASK, "previous_response_id": "../../v1/models"})
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "previous_response_id"
    assert (await client.get("/v1/responses/resp%20x")).status == 404
    assert (await client.delete("/v1/responses/resp_x")).status == 404


async def test_the_holder_down_is_a_503_not_another_worker(aiohttp_client, aiohttp_server):
    servers, urls = await workers(aiohttp_server)
    client = await aiohttp_client(create_app(two_workers(urls)))
    first = await client.post("/v1/responses", json=ASK)
    holder = first.headers["x-kvroute-worker"]
    other = servers[1 - urls.index(holder)]
    seen_by_other = len(other.app[SEEN])
    await servers[urls.index(holder)].close()
    follow = {**ASK, "previous_response_id": (await first.json())["id"]}
    refused = await client.post("/v1/responses", json=follow)  # the connection is refused: the holder is ejected
    assert refused.status == 502
    again = await client.post("/v1/responses", json=follow)
    error = (await again.json())["error"]
    assert again.status == 503 and holder in error["message"] and error["param"] == "previous_response_id"
    assert len(other.app[SEEN]) == seen_by_other  # never sent to a worker that cannot hold it


async def test_another_tenants_response_is_not_found(aiohttp_client, aiohttp_server):
    servers, urls = await workers(aiohttp_server)
    governance = {"tenants": [{"name": "a", "keys": ["sk-a"]}, {"name": "b", "keys": ["sk-b"]}]}
    client = await aiohttp_client(create_app(two_workers(urls, governance=governance)))
    a, b = {"Authorization": "Bearer sk-a"}, {"Authorization": "Bearer sk-b"}
    first = await client.post("/v1/responses", json=ASK, headers=a)
    made = (await first.json())["id"]
    assert made in {k for s in servers for k in s.app[STORED]}
    assert (await client.get(f"/v1/responses/{made}", headers=b)).status == 404
    assert (await client.post("/v1/responses", json={**ASK, "previous_response_id": made}, headers=b)).status == 404
    assert (await client.get(f"/v1/responses/{made}", headers=a)).status == 200
    page = (await (await client.get("/metrics")).read()).decode()
    assert 'kvroute_stored_response_lookups_total{result="other_tenant"} 2.0' in page
    assert (await client.get(f"/v1/responses/{made}", headers={"Authorization": "Bearer sk-wrong"})).status == 401
    assert (await client.get(f"/v1/responses/{made}")).status == 401


async def test_replicas_share_records_and_tenants_through_redis(aiohttp_client, aiohttp_server, redis_url):
    """Two replicas with governance.redis: one relays a response, the other finds its worker
    and its tenant in Redis, without asking the workers."""
    servers, urls = await workers(aiohttp_server)
    governance = {"tenants": [{"name": "a", "keys": ["sk-a"]}, {"name": "b", "keys": ["sk-b"]}],
                  "redis": {"url": redis_url, "prefix": f"test:{uuid.uuid4().hex[:12]}", **PATIENT}}
    one, two = [await aiohttp_client(create_app(two_workers(urls, governance=governance))) for _ in range(2)]
    a, b = {"Authorization": "Bearer sk-a"}, {"Authorization": "Bearer sk-b"}
    first = await one.post("/v1/responses", json=ASK, headers=a)
    holder, made = first.headers["x-kvroute-worker"], (await first.json())["id"]
    follow = {**ASK, "previous_response_id": made}
    assert (await two.get(f"/v1/responses/{made}", headers=b)).status == 404  # another tenant's, on any replica
    three = await aiohttp_client(create_app(two_workers(urls, governance=governance)))
    for replica in (two, three, three):
        resp = await replica.post("/v1/responses", json=follow, headers=a)
        assert resp.status == 200 and resp.headers["x-kvroute-worker"] == holder
    assert not [x for s in servers for x in s.app[SEEN] if x.get("method") == "GET"]  # no worker was asked
    page = (await (await two.get("/metrics")).read()).decode()
    assert 'kvroute_stored_response_lookups_total{result="other_tenant"} 1.0' in page
    page = (await (await three.get("/metrics")).read()).decode()
    assert 'kvroute_stored_response_lookups_total{result="shared"} 1.0' in page  # then kept on this replica
    assert 'kvroute_stored_response_lookups_total{result="recorded"} 1.0' in page


async def test_with_redis_down_each_replica_asks_the_workers(aiohttp_client, aiohttp_server, caplog):
    servers, urls = await workers(aiohttp_server)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens here once the socket closes
    governance = {"redis": {"url": f"redis://127.0.0.1:{closed}/0"},
                  "on_store_error": {"budgets": "fail_open", "kill_switch": "fail_open"}}
    one, two = [await aiohttp_client(create_app(two_workers(urls, governance=governance))) for _ in range(2)]
    first = await one.post("/v1/responses", json=ASK)
    assert first.status == 200
    follow = await two.post("/v1/responses", json={**ASK, "previous_response_id": (await first.json())["id"]})
    assert follow.status == 200 and follow.headers["x-kvroute-worker"] == first.headers["x-kvroute-worker"]
    page = (await (await two.get("/metrics")).read()).decode()
    assert 'kvroute_stored_response_lookups_total{result="asked"} 1.0' in page
    assert "stored responses: Redis failed" in caplog.text


async def test_a_record_that_lands_while_the_workers_are_asked_still_names_its_tenant(
        aiohttp_client, aiohttp_server, redis_url):
    """Replica two misses the record in Redis, asks the workers, and the record lands
    meanwhile: its tenant still counts."""
    _, urls = await workers(aiohttp_server)
    governance = {"tenants": [{"name": "a", "keys": ["sk-a"]}, {"name": "b", "keys": ["sk-b"]}],
                  "redis": {"url": redis_url, "prefix": f"test:{uuid.uuid4().hex[:12]}", **PATIENT}}
    one, two = [await aiohttp_client(create_app(two_workers(urls, governance=governance))) for _ in range(2)]
    stored_one = one.app[keys.STORED_RESPONSES]
    held = []
    stored_one.shared.put = lambda rid, entry: held.append((rid, entry))  # the write is late
    first = await one.post("/v1/responses", json=ASK, headers={"Authorization": "Bearer sk-a"})
    made = (await first.json())["id"]
    stored_two = two.app[keys.STORED_RESPONSES]
    ask = stored_two._ask_workers

    async def ask_then_land(session, response_id):
        found = await ask(session, response_id)
        await SharedRecords._put(stored_one.shared, *held[0])
        return found

    stored_two._ask_workers = ask_then_land
    assert (await two.get(f"/v1/responses/{made}", headers={"Authorization": "Bearer sk-b"})).status == 404
    assert (await two.get(f"/v1/responses/{made}", headers={"Authorization": "Bearer sk-a"})).status == 200

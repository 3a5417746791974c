"""Every list pages as OpenAI's do (issue 13, item 1): `limit`, `after`, `has_more`, `first_id`, `last_id`.

The official SDK's auto-pagination (`for f in client.files.list(): ...`) sends `last_id` back as `after` until
`has_more` is false. `GET /v1/files` had neither, so that loop asked for the same page forever; the tests cap
the iteration so that a regression fails instead of hanging.
"""

from __future__ import annotations

import itertools
import uuid

import httpx
import openai
import pytest

from tests.test_fine_tuning import TRAIN, new_tenant, upload

CAP = 50  # more items than any test makes: an iteration reaching it never ended


def iterate(pages) -> list:
    items = list(itertools.islice(pages, CAP))
    assert len(items) < CAP, "the SDK's auto-pagination never ended"
    return items


@pytest.fixture(scope="module")
def paged(gateway):
    """A tenant with five files and three jobs (cancelled at once: no worker runs them), and a neighbour
    with a file of its own."""
    tenant = f"pager-{uuid.uuid4().hex[:6]}"
    client = gateway.client(new_tenant(gateway, tenant))
    files = [upload(client, TRAIN, f"train-{i}.jsonl") for i in range(5)]
    jobs = []
    for file in files[:3]:
        job = client.fine_tuning.jobs.create(model=gateway.settings.served_model_name, training_file=file.id)
        client.fine_tuning.jobs.cancel(job.id)
        jobs.append(job)
    neighbour = gateway.client(new_tenant(gateway, f"neighbour-{uuid.uuid4().hex[:6]}"))
    return tenant, client, files, jobs, neighbour, upload(neighbour, TRAIN)


def test_files_list_pages_newest_first_and_ends(paged):
    _, client, files, _, _, theirs = paged
    seen = iterate(client.files.list(limit=2))
    assert [f.id for f in seen] == [f.id for f in reversed(files)], "each file once, newest first"
    page = client.files.list(limit=2)
    assert page.has_more and page.first_id == files[-1].id and page.last_id == files[-2].id
    assert [f.id for f in iterate(client.files.list(limit=2, order="asc"))] == [f.id for f in files]
    assert theirs.id not in {f.id for f in seen}


def test_jobs_and_their_events_page_and_end(paged):
    _, client, _, jobs, _, _ = paged
    seen = iterate(client.fine_tuning.jobs.list(limit=1))
    assert [j.id for j in seen] == [j.id for j in reversed(jobs)]
    events = iterate(client.fine_tuning.jobs.list_events(jobs[0].id, limit=1))
    assert len(events) >= 2 and len({e.id for e in events}) == len(events), "each event once"
    everything = client.fine_tuning.jobs.list_events(jobs[0].id, limit=100)
    assert [e.id for e in events] == [e.id for e in everything.data] and not everything.has_more


def test_a_cursor_of_another_tenant_pages_nothing_of_theirs(paged):
    """`after` naming another tenant's object is a 404, the same as one that does not exist: no page of
    theirs, and no way to tell their ids from made-up ones."""
    _, client, _, _, neighbour, theirs = paged
    for after in (theirs.id, "file-doesnotexist"):
        with pytest.raises(openai.NotFoundError) as refused:
            client.files.list(after=after)
        assert refused.value.body["param"] == "after"
    assert [f.id for f in neighbour.files.list()] == [theirs.id]


@pytest.mark.parametrize("query", ["limit=0", "limit=10001", "limit=x", "order=sideways"])
def test_bad_page_parameters_are_a_400_naming_them(paged, gateway, query):
    _, client, _, _, _, _ = paged
    answer = httpx.get(f"{gateway.url}/v1/files?{query}", headers={"Authorization": f"Bearer {client.api_key}"},
                       timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == query.split("=")[0]


def test_admin_lists_page(paged, gateway):
    tenant, _, _, _, _, _ = paged
    for _ in range(2):
        assert gateway.admin("POST", f"/tenants/{tenant}/keys").status_code == 201

    def walk(path: str) -> list[str]:
        ids, after = [], None
        for _ in range(CAP):
            page = gateway.admin("GET", path, params={"limit": 1, **({"after": after} if after else {})}).json()
            ids += [item.get("id") or item.get("name") for item in page["data"]]
            if not page["has_more"]:
                return ids
            assert page["last_id"] == ids[-1]
            after = page["last_id"]
        raise AssertionError(f"{path} never ended")

    keys = walk(f"/tenants/{tenant}/keys")
    assert len(keys) == len(set(keys)) == 3
    tenants = walk("/tenants")
    assert tenants == sorted(tenants) and tenant in tenants
    assert walk("/tenants/beta/adapters") == ["legal", "support"]
    audit = gateway.admin("GET", "/audit", params={"limit": 2}).json()
    older = gateway.admin("GET", "/audit", params={"limit": 2, "after": audit["last_id"]}).json()
    assert audit["has_more"] and int(older["first_id"]) < int(audit["last_id"])


def test_a_model_is_retrieved_by_any_name_the_tenant_may_use(gateway):
    """`client.models.retrieve` was a 404 for every model (there was no `GET /v1/models/{id}`)."""
    alpha, beta = (gateway.client(gateway.tenants[t].key) for t in ("alpha", "beta"))
    base = gateway.settings.served_model_name
    assert alpha.models.retrieve("support").owned_by == "alpha"
    assert alpha.models.retrieve("support@1").id == "support@1"
    assert alpha.models.retrieve(base).id == base
    assert {m.id for m in alpha.models.list()} >= {"support", base}
    for missing in ("legal", "support@99", "nothing"):  # legal is beta's, not alpha's
        with pytest.raises(openai.NotFoundError) as refused:
            alpha.models.retrieve(missing)
        assert refused.value.body["code"] == "model_not_found"
    assert beta.models.retrieve("legal").owned_by == "beta"

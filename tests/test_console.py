"""The operator console in a real browser (Debian's Chromium driven by Playwright) on the real gateway and engine.

Each page's screenshot is saved under .cache/test-artifacts/console/ (the README shows two of them).
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Page, expect, sync_playwright

from server.api.app import create_app
from server.config import Settings
from tests.conftest import ADMIN_KEY, REPO, make_peft_adapter
from tests.test_fine_tuning import TRAIN, VALIDATION, WorkerProcess, conversation, jsonl, new_tenant, upload

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / ".cache" / "test-artifacts" / "console"
# Chromium's own connections (updates, sync...) would be refused here; the gateway is all it should reach.
QUIET = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-sandbox"]
WAIT_MS = 180_000  # liveness, not speed: a loaded machine takes its time
EVAL_MS = 900_000  # an upload waits for its evaluation
GOLDEN_ANSWERS = {"What is the capital of France?": "Paris.", "What is 2 + 2?": "4.",
                  "What color is grass?": "Green.", "How many days are in a week?": "Seven."}
GOLDEN = jsonl(conversation(question, answer) for question, answer in GOLDEN_ANSWERS.items())
expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=QUIET)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, gateway):
    """A fresh browser profile at 1280x800 that fails the test on any script error or policy violation."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=gateway.url)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" and (
        "Content Security Policy" in msg.text or "Refused" in msg.text) else None)
    page.on("dialog", lambda dialog: dialog.accept())  # the console confirms deletes and revokes
    yield page
    context.close()
    assert not problems, problems


def sign_in(page: Page, key: str = ADMIN_KEY) -> None:
    page.goto("/console")
    page.fill("#signin-key", key)
    page.click("#signin-form button[type=submit]")


def signed_in(page: Page) -> None:
    sign_in(page)
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#signin")).to_be_hidden()


def shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    return path


def test_the_console_is_served_with_a_strict_policy(gateway):
    page = httpx.get(f"{gateway.url}/console", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    scripts = re.findall(r"<script\b[^>]*>", page.text)
    assert scripts and all("src=" in tag for tag in scripts), scripts  # no inline script
    assert not re.search(r"\son[a-z]+\s*=", page.text) and "style=" not in page.text
    script = httpx.get(f"{gateway.url}/console/static/js/main.js", timeout=30)
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    for path in ("/console/static/nothing.js", "/console/static/../../server/config.py",
                 "/console/static/%2e%2e/routes.py"):
        missed = httpx.get(f"{gateway.url}{path}", timeout=30)
        assert missed.status_code == 404 and missed.json()["error"]["code"] == "not_found"


def test_the_console_can_be_turned_off(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path, console=False, admin_key=ADMIN_KEY)
    client = TestClient(create_app(settings))  # no lifespan: only the routes are looked at
    assert client.get("/console").status_code == 404
    assert client.get("/console/static/js/main.js").status_code == 404


def test_sign_in_refuses_a_wrong_key_and_a_tenants_key(page, gateway):
    sign_in(page, "not-the-admin-key")
    expect(page.locator("#signin-error")).to_contain_text("not accepted")
    expect(page.locator("#app")).to_be_hidden()
    sign_in(page, gateway.tenants["alpha"].key)
    expect(page.locator("#signin-error")).to_contain_text("not an admin key")
    expect(page.locator("#app")).to_be_hidden()
    shot(page, "sign-in-refused")
    # The key is kept nowhere but the page's memory.
    signed_in(page)
    assert page.context.cookies() == []
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert ADMIN_KEY not in page.url
    page.reload()
    expect(page.locator("#signin")).to_be_visible()  # a reload signs out


def test_an_operator_manages_tenants_keys_and_adapter_versions(page, gateway, tmp_path, base_model_path):
    signed_in(page)
    page.fill("#tenant-id", "console-acme")
    page.fill("#tenant-rpm", "600")
    page.click("#tenant-create-form button[type=submit]")
    row = page.locator('#tenants-table tr[data-tenant="console-acme"]')
    expect(row).to_contain_text("600")
    assert gateway.admin("GET", "/tenants/console-acme").json()["limits"]["requests_per_minute"] == 600
    shot(page, "tenants")

    row.locator("a").first.click()
    expect(page.locator("#tenant-title")).to_have_text("console-acme")
    page.click("#key-create")
    secret = page.locator("#new-key-secret").text_content()
    client = gateway.client(secret)
    assert client.models.list().data  # the key shown once works

    first, second = (make_peft_adapter(base_model_path, tmp_path / f"v{n}", seed=40 + n) for n in (1, 2))
    for version, folder in enumerate((first, second), 1):
        if version == 2:  # from now on each version is evaluated on a golden set before it serves
            golden = client.files.create(file=("golden.jsonl", GOLDEN), purpose="evals").id
            attached = gateway.admin("PATCH", "/tenants/console-acme/adapters/helpdesk", json={"golden_set": golden})
            assert attached.status_code == 200, attached.text
        page.fill("#upload-name", "helpdesk")
        page.set_input_files("#upload-files", sorted(str(p) for p in folder.iterdir()))
        page.click("#upload-form button[type=submit]")
        # An evaluation takes its time on a loaded machine: the page waits as long as the request runs.
        expect(page.locator("#upload-status")).to_contain_text(f"Published helpdesk v{version}", timeout=EVAL_MS)
    expect(page.locator('#adapters-table tr[data-adapter="helpdesk"]')).to_contain_text("v2")
    shot(page, "tenant")

    page.locator('#adapters-table tr[data-adapter="helpdesk"] a').first.click()
    newest = page.locator('#versions-table tr[data-version="2"]')
    expect(newest).to_have_class(re.compile(r"\bactive\b"))
    for cell in ("golden-adapter", "golden-base", "golden-few-shot"):  # the evaluation, side by side
        expect(newest.locator(f"td.{cell}")).to_contain_text("%")
    expect(page.locator('details.report[data-version="2"]')).to_be_attached()
    page.locator('#versions-table tr[data-version="1"] button.activate').click()
    expect(page.locator('#versions-table tr[data-version="1"]')).to_have_class(re.compile(r"\bactive\b"))
    assert gateway.admin("GET", "/tenants/console-acme/adapters/helpdesk").json()["active_version"] == 1
    shot(page, "adapter")

    # A bad upload shows the API's own message.
    page.goto("/console#/tenants/console-acme")
    page.fill("#upload-name", "broken")
    page.set_input_files("#upload-files", [str(first / "adapter_config.json")])
    page.click("#upload-form button[type=submit]")
    expect(page.locator("#error")).to_contain_text("422: 'adapter_model.safetensors' is missing")

    key_id = gateway.admin("GET", "/tenants/console-acme/keys").json()["data"][0]["id"]
    page.locator(f'#keys-table tr[data-key="{key_id}"] button.revoke').click()
    expect(page.locator(f'#keys-table tr[data-key="{key_id}"]')).to_contain_text("revoked")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_names_and_messages_are_shown_as_text(page):
    """A name is user input: what the API echoes back in an error is shown, never run."""
    signed_in(page)
    page.fill("#tenant-id", '<img src=x onerror="window.pwned=1">')
    page.click("#tenant-create-form button[type=submit]")
    expect(page.locator("#error")).to_contain_text("<img src=x")
    assert page.locator("#error img").count() == 0
    assert page.evaluate("window.pwned === undefined")


def test_a_jobs_loss_curve_grows_while_it_trains(page, gateway):
    key = new_tenant(gateway, "console-train")
    client = gateway.client(key)
    job = client.fine_tuning.jobs.create(
        model=gateway.settings.served_model_name, training_file=upload(client, TRAIN).id,
        validation_file=upload(client, VALIDATION, "validation.jsonl").id, suffix="curve",
        hyperparameters={"n_epochs": 3})
    signed_in(page)
    page.goto(f"/console#/tenants/console-train/jobs/{job.id}")
    # No worker yet: nothing can have trained.
    expect(page.locator("#job-status")).to_have_text(re.compile("validating_files|queued"))
    expect(page.locator("#loss-chart-empty")).to_be_visible()
    worker = WorkerProcess(gateway)
    worker.start()  # the page, left alone, must now show the points as they come
    try:
        expect(page.locator("#loss-chart circle.train-point").first).to_be_attached()
        expect(page.locator("#job-status")).to_have_text("succeeded")
        expect(page.locator("#loss-chart circle.valid-point").first).to_be_attached()
    finally:
        worker.stop()
    steps = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data
             if isinstance((e.data or {}).get("loss"), float)]
    expect(page.locator("#loss-chart circle.train-point")).to_have_count(len(steps))
    expect(page.locator("#job-events li").first).to_be_visible()
    shot(page, "job")


def test_a_queued_job_is_cancelled_from_its_page(page, gateway):
    key = new_tenant(gateway, "console-cancel")
    client = gateway.client(key)
    job = client.fine_tuning.jobs.create(model=gateway.settings.served_model_name,
                                         training_file=upload(client, TRAIN).id, suffix="never")
    signed_in(page)
    page.goto(f"/console#/tenants/console-cancel/jobs/{job.id}")  # no worker runs: it stays queued
    page.click("#job-cancel")
    expect(page.locator("#job-status")).to_have_text("cancelled")
    expect(page.locator("#job-cancel")).to_be_hidden()
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def test_the_traffic_page_shows_requests_and_engines(page, gateway):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    for _ in range(2):
        alpha.chat.completions.create(model="support", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    signed_in(page)
    page.click("#nav-traffic")
    row = page.locator('#traffic-table tr[data-series="alpha/support"]')
    expect(row.locator("td.requests")).to_have_text(re.compile(r"^[1-9][0-9,]*$"))  # the row exists and counts some
    expect(page.locator("#engines-table tr.engine td.up")).to_have_text("in rotation")
    expect(page.locator("#engines-table tr.engine")).to_contain_text("support@")
    shot(page, "traffic")


def test_a_narrow_window_needs_no_sideways_scrolling(page):
    page.set_viewport_size({"width": 400, "height": 800})
    signed_in(page)
    expect(page.locator("#tenants-table tr[data-tenant]").first).to_be_visible()
    drawn_by_route = {"#/tenants": "#tenants-table tr[data-tenant]", "#/tenants/alpha": "#keys-table tr[data-key]",
                      "#/traffic": "#engines-table tr.engine"}
    for route, drawn in drawn_by_route.items():
        page.goto(f"/console{route}")
        expect(page.locator(drawn).first).to_be_visible()
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, (route, overflow)
    shot(page, "narrow")

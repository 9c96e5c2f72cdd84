"""The dashboard in a real headless Chromium: a real fork storm shows up in the page, as text."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
from pathlib import Path

import pytest
from harness import (
    free_port,
    packaged_rule,
    rules_toml,
    run_forker_retried,
    start_agent,
    wait_for,
    wait_http_ok,
    write_rules,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DEADLINE_S = 30.0
# Markup in a process name must reach the page as text (comm is at most 15 bytes).
HOSTILE_COMM = "<i>ksdash</i>"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_page(driver, check, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, DEADLINE_S, poll_frequency=0.2).until(lambda d: check(d))
    except Exception as exc:
        raise AssertionError(f"page never showed {what}: {exc!r}\n{driver.page_source[:4000]}") from None


def number(text: str) -> int:
    return int(re.sub(r"[^\d]", "", text) or 0)


def test_fork_storm_appears_in_the_dashboard(tmp_path, browser):
    from selenium.webdriver.common.by import By

    rules = write_rules(tmp_path / "rules.toml", packaged_rule("fork_storm"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    agent = start_agent(tmp_path, "--rules", str(rules), api=f"127.0.0.1:{port}")
    try:
        agent.wait_ready()
        wait_http_ok(base + "/readyz", DEADLINE_S)
        # No [api] token configured: the agent made one; the browser gives it once for a session cookie.
        browser.get(base + "/")
        assert 'action="/login"' in browser.page_source  # not logged in yet: the login form
        browser.get(f"{base}/?token={agent.api_token}")
        wait_page(browser, lambda d: d.find_element(By.ID, "stream-status").text == "live", "the live stream")
        wait_page(browser, lambda d: d.find_element(By.ID, "host-status").text == "ready", "the agent ready")

        work = run_forker_retried(rate=200, seconds=3, comm=HOSTILE_COMM)
        expected = f"PID {work['pid']} ({HOSTILE_COMM}) forked"

        def our_alert(d):
            items = d.find_elements(By.CSS_SELECTOR, "#alerts li.alert")
            return [i for i in items if expected in i.text]

        [item] = wait_page(browser, our_alert, "the fork-storm alert")[:1]
        assert "fork_storm" in item.text and "warning" in item.text.lower()
        # The process name was shown as text, never turned into an element.
        assert browser.find_elements(By.CSS_SELECTOR, "#alerts i, #incidents i") == []

        # The funnel: kernel events counted, far more than alerts.
        wait_page(browser, lambda d: number(d.find_element(By.ID, "funnel-alerts-total").text) >= 1,
                  "an alert in the funnel")
        kernel_total = number(browser.find_element(By.ID, "funnel-kernel-total").text)
        assert kernel_total >= work["forks"]
        assert "events per alert" in browser.find_element(By.ID, "funnel-ratio").text
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
    finally:
        code = agent.terminate()
    assert code == 0, agent.stderr()


def test_actions_panel_shows_action_events(tmp_path, browser):
    """Remediation will stream "action" events; the page must show them (published from another thread)."""
    from selenium.webdriver.common.by import By

    from ksift.agent import Agent
    from ksift.config import AgentConfig
    from ksift.enrich.cgroup import CgroupResolver
    from ksift.enrich.context import Enricher
    from ksift.enrich.procfs import ProcFS
    from ksift.interfaces.api import ApiServer
    from ksift.interfaces.settings import parse_api
    from ksift.rules.parse import parse_rules
    from ksift.store.sqlite import AlertStore

    store = AlertStore(tmp_path / "alerts.db")
    api = ApiServer(parse_api({"listen": "127.0.0.1:0"}, "test"), store)
    rules = parse_rules(rules_toml(packaged_rule("fork_storm")), "rules.toml")
    agent = Agent(AgentConfig(), rules, [], Enricher(ProcFS(), CgroupResolver(None)), [api])
    loop = asyncio.new_event_loop()
    stopped = threading.Event()

    async def serve():
        await api.start()
        while not stopped.is_set():
            await asyncio.sleep(0.05)
        await api.stop()

    server = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    server.start()
    try:
        wait_for("the API listening", lambda: api.urls, DEADLINE_S, interval=0.05)
        agent.ready = True
        browser.get(api.urls[0] + "/")
        wait_page(browser, lambda d: d.find_element(By.ID, "stream-status").text == "live", "the live stream")
        action = {"ts": "2026-11-25T12:00:00Z", "action": "freeze_cgroup", "state": "pending",
                  "summary": "would freeze <b>/ks-test</b>", "target": {"pid": 4242}}
        api.publish("action", action)  # from this thread: it hops into the server's loop

        def shown(d):
            items = d.find_elements(By.CSS_SELECTOR, "#actions li.action")
            return [i for i in items if "freeze_cgroup" in i.text]

        [item] = wait_page(browser, shown, "the action")
        assert "would freeze <b>/ks-test</b>" in item.text and "pending" in item.text.lower()
        assert browser.find_elements(By.CSS_SELECTOR, "#actions b") == []
        pre = item.find_element(By.TAG_NAME, "pre").get_attribute("textContent")
        assert json.loads(pre) == action
    finally:
        stopped.set()
        server.join(timeout=DEADLINE_S)
        loop.close()
        store.close()

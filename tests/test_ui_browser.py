"""The web UI in a real headless Chromium (Debian's chromium + chromium-driver through Selenium; bin/test installs
them with scripts/browser.sh). Set POISE_SKIP_BROWSER=1 to skip on a machine without them; CI never sets it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from app.runner import run
from app.ui import serve_ui
from archive.sqlite_store import SQLiteStore
from poise.contracts import EvtFailed, EvtProposed, Failure, Phase, RunConfig
from poise.description.proposals import root_proposal

pytestmark = [pytest.mark.browser, pytest.mark.slow]

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if os.environ.get("POISE_SKIP_BROWSER") == "1":
        pytest.skip("POISE_SKIP_BROWSER=1")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("no chromium/chromedriver: run scripts/browser.sh (bin/test does) or set POISE_SKIP_BROWSER=1")
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--disable-background-networking", "--no-first-run"):
        options.add_argument(argument)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.set_page_load_timeout(60)
    yield chrome
    chrome.quit()


class UI:
    """`serve_ui` on a run directory in a thread, on a free port."""

    def __init__(self, run_dir: Path) -> None:
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.address = ""
        self.error: BaseException | None = None

        def serve() -> None:
            try:
                serve_ui(run_dir, port=0, on_ready=self._ready, stop=self.stop)
            except BaseException as err:  # noqa: BLE001 - reported by the test
                self.error = err
                self.ready.set()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert self.ready.wait(30) and self.error is None, self.error

    def _ready(self, address: str) -> None:
        self.address = address.rstrip("/")
        self.ready.set()

    def url(self, path: str) -> str:
        return self.address + path

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def add_failed_run(run_dir: Path) -> None:
    """A second run in the same archive whose only child failed in implementation, with its reason."""
    config = RunConfig(run_id="f", budget=1, protocol="tiny")
    with SQLiteStore.in_run_dir(run_dir) as store:
        from archive.update import ArchiveUpdater

        store.put_run(config)
        updater = ArchiveUpdater(store)
        updater.apply(EvtProposed(run_id="f", node_id="n000", proposal=root_proposal()))
        child = root_proposal().model_copy(update={"name": "grpo+<script>alert(1)</script>", "parent_ids": ["n000"]})
        updater.apply(EvtProposed(run_id="f", node_id="n001", proposal=child))
        outcome = updater.apply(EvtFailed(run_id="f", node_id="n001", failure=Failure(
            phase=Phase.IMPLEMENT, reason="verification failed 3 times: loss was NaN at step 2")))
        assert outcome.outcome.value == "applied", outcome


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Iterator[tuple[UI, Path]]:
    run_dir = tmp_path_factory.mktemp("finished")
    run(RunConfig(run_id="b", budget=3, parallel=1, protocol="tiny", root_seeds=1, replicate_seeds=1), run_dir)
    add_failed_run(run_dir)
    ui = UI(run_dir)
    yield ui, run_dir
    ui.close()


def wait(browser, condition, timeout_s: float = 30.0, what: str = "condition"):
    return WebDriverWait(browser, timeout_s, poll_frequency=0.2).until(lambda _: condition(), message=what)


def count(text: str) -> int:
    """The first number in an element's text ("12 nodes" -> 12)."""
    return int(next(word for word in text.replace(":", " ").split() if word.isdigit()))


def tree_nodes(browser) -> list[str]:
    return [e.get_attribute("data-node") for e in browser.find_elements(By.CSS_SELECTOR, "#tree .node")]


def test_the_tree_shows_every_node_and_a_click_opens_the_node_with_its_diff_and_curves(browser, finished):
    ui, run_dir = finished
    with SQLiteStore(run_dir / "archive.db", read_only=True) as store:
        expected = sorted(n.node_id for n in store.nodes("b"))
        child = next(n for n in store.nodes("b") if n.genealogy.parent_ids)
    browser.get(ui.url("/runs/b/tree"))
    wait(browser, lambda: sorted(tree_nodes(browser)) == expected, what=f"the tree to show {expected}")
    link = browser.find_element(By.CSS_SELECTOR, f'#tree .node[data-node="{child.node_id}"]')
    browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", link)
    wait(browser, lambda: browser.current_url.endswith(f"/runs/b/nodes/{child.node_id}"), what="the node page")
    diff = browser.find_element(By.ID, "code-diff")
    assert diff.find_elements(By.CSS_SELECTOR, ".add") or diff.find_elements(By.CSS_SELECTOR, ".del")
    curves = browser.find_elements(By.CSS_SELECTOR, "#curves svg.curve")
    assert {c.get_attribute("data-metric") for c in curves} >= {"reward"}
    assert child.genealogy.parent_ids[0] in browser.find_element(By.TAG_NAME, "main").text

    browser.get(ui.url(f"/runs/b/compare?a={child.genealogy.parent_ids[0]}&b={child.node_id}"))
    compare = browser.find_element(By.ID, "compare")
    assert child.node_id in compare.text and child.genealogy.parent_ids[0] in compare.text
    assert browser.find_elements(By.CSS_SELECTOR, "#code-diff .add, #code-diff .del")


def test_a_failed_node_shows_its_phase_and_reason_and_unknown_ids_get_a_clear_message(browser, finished):
    ui, _ = finished
    browser.get(ui.url("/runs/f/nodes/n001"))
    failure = browser.find_element(By.ID, "failure")
    assert failure.get_attribute("data-phase") == "implement" and "loss was NaN at step 2" in failure.text
    assert "<script>alert(1)</script>" in browser.find_element(By.TAG_NAME, "main").text   # shown, not run
    browser.get(ui.url("/runs/f/tree"))
    wait(browser, lambda: len(tree_nodes(browser)) == 2, what="the failed run's tree")
    failed = browser.find_element(By.CSS_SELECTOR, '#tree .node[data-node="n001"]')
    assert failed.get_attribute("data-status") == "failed"
    for path, words in (("/runs/b/nodes/n999", "n999"), ("/runs/nope", "nope"), ("/no/such/page", "no page")):
        browser.get(ui.url(path))
        text = browser.find_element(By.TAG_NAME, "body").text
        assert words in text and "Traceback" not in text, (path, text)


def test_a_run_in_progress_grows_on_the_overview_and_the_tree_without_a_reload(browser, tmp_path):
    run_dir = tmp_path / "live"
    command = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))", "run",
               "--run-dir", str(run_dir), "--protocol", "tiny", "--budget", "6", "--parallel", "1",
               "--root-seeds", "1", "--replicate-seeds", "1"]
    log = (tmp_path / "run.out").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    ui = None
    try:
        wait(browser, lambda: (run_dir / "archive.db").exists(), 120, "the run's archive")
        time.sleep(0.5)
        ui = UI(run_dir)
        browser.get(ui.url(f"/runs/{run_dir.name}"))
        wait(browser, lambda: browser.find_elements(By.ID, "nodes-total"), 60, "the overview")
        seen = count(browser.find_element(By.ID, "nodes-total").text)
        browser.execute_script("window.__notReloaded = true")
        wait(browser, lambda: count(browser.find_element(By.ID, "nodes-total").text) > seen, 300,
             "the overview to count a new node")
        assert browser.execute_script("return window.__notReloaded === true"), "the overview was reloaded"
        assert process.poll() is None, "the run ended before the overview could be watched growing"

        browser.get(ui.url(f"/runs/{run_dir.name}/tree"))
        wait(browser, lambda: len(tree_nodes(browser)) >= 1, 60, "the root in the tree")
        first = len(tree_nodes(browser))
        browser.execute_script("window.__notReloaded = true")
        wait(browser, lambda: len(tree_nodes(browser)) > first, 300, "a new node in the tree")
        assert browser.execute_script("return window.__notReloaded === true"), "the tree was reloaded"
    finally:
        if process.poll() is None:   # seen growing: the rest of the run is not this test's business
            process.send_signal(signal.SIGINT)   # Ctrl-C: the run stops cleanly, resumable
        process.wait(120)
        log.close()
        if ui is not None:
            ui.close()
    assert process.returncode in (0, 130), (tmp_path / "run.out").read_text()[-3000:]


def test_no_request_leaves_the_servers_origin(browser, finished):
    ui, _ = finished
    browser.get_log("performance")   # start from an empty log
    for path in ("/", "/runs/b", "/runs/b/tree", "/runs/b/figures", "/runs/b/nodes/n001",
                 "/runs/b/compare?a=n000&b=n001", "/runs/f/nodes/n001"):
        browser.get(ui.url(path))
        time.sleep(2.5)   # a poll or two of the live pages
    origin = urlsplit(ui.address)
    requested = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requested.append(message["params"]["request"]["url"])
    assert len(requested) >= 7
    foreign = [u for u in requested if not u.startswith(("data:", "about:"))
               and (urlsplit(u).scheme, urlsplit(u).netloc) != (origin.scheme, origin.netloc)]
    assert not foreign, foreign

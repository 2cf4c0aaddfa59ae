"""The Prefect UI of ``lesionflow serve`` in a real headless Chromium (Debian's chromium + chromedriver, Selenium).

A user's path: the deployments list shows nightly-retrain and its schedule, its page shows the next run at 02:00
in the params' time zone, and a "Custom run" of the ingest deployment completes with another params file and one
key of its ``quality`` section changed, every other key keeping that params file's value (issue 19, item 1).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prefect.client.schemas.objects import FlowRun

from lesionflow.caching import read_record
from lesionflow.params import load_params
from lesionflow.workspace import Workspace
from tests.flows.serve_helpers import Served, make_workspace, start_serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TIMEZONE = "Europe/Berlin"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
        "apt-get install chromium chromium-driver",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (requirements/requirements.txt)")
from selenium.common.exceptions import (  # noqa: E402
    ElementClickInterceptedException,
    StaleElementReferenceException,
)
from selenium.webdriver.chromium.webdriver import ChromiumDriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for Chromium's sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",  # offline machine: no update, sync or field-trial calls
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for a failure's message
    # The page shows times in the browser's zone: pin it, so 02:00 Europe/Berlin has one expected rendering.
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER), env={**os.environ, "TZ": "UTC"})
    driver = webdriver.Chrome(service=service, options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def body_text(driver: WebDriver) -> str:
    return str(driver.find_element(By.TAG_NAME, "body").text)


def wait_for_text(driver: WebDriver, needle: str, timeout_s: float = 30.0) -> None:
    WebDriverWait(driver, timeout_s, poll_frequency=0.3).until(
        lambda d: needle in body_text(d), f"{needle!r} not on {driver.current_url}"
    )


def button(label: str) -> Callable[[WebDriver], WebElement | None]:
    return lambda d: next((b for b in d.find_elements(By.TAG_NAME, "button") if b.text.strip() == label), None)


def link(text: str, exact: bool = True) -> Callable[[WebDriver], WebElement | None]:
    by = By.LINK_TEXT if exact else By.PARTIAL_LINK_TEXT
    return lambda d: next(iter(d.find_elements(by, text)), None)


def click(driver: WebDriver, find: Callable[[WebDriver], WebElement | None], timeout_s: float = 30.0) -> None:
    """Click what ``find`` returns once it is there; the single-page app re-renders, so retry stale elements."""

    def attempt(d: WebDriver) -> bool:
        element = find(d)
        if element is None:
            return False
        element.click()
        return True

    retry = (StaleElementReferenceException, ElementClickInterceptedException)  # re-rendered, or under a toast
    WebDriverWait(driver, timeout_s, poll_frequency=0.3, ignored_exceptions=retry).until(
        attempt, f"nothing to click on {driver.current_url}"
    )


def form_input(driver: WebDriver, label: str) -> WebElement | None:
    """The input of the form key labelled ``label`` (the title, then " (Optional)" for a key that may stay empty)."""
    found = driver.find_elements(
        By.XPATH,
        f"//span[contains(@class, 'schema-form-property__label') and normalize-space() = '{label}']"
        "/ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' p-label ')][1]"
        "//*[self::input or self::textarea]",
    )
    return found[0] if found else None


def console_errors(driver: WebDriver) -> list[str]:
    """The browser console's errors since the last call (reading the log empties it)."""
    assert isinstance(driver, ChromiumDriver)  # the console log is Chromium's
    return [str(entry["message"]) for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def what_went_wrong(driver: WebDriver, ws: Path, console: list[str]) -> str:
    """The page's end, the browser console's errors and the Prefect server log's end: a failure's evidence."""
    server_log = ws / ".prefect" / "logs" / "server.log"
    server = server_log.read_text(errors="replace")[-3000:] if server_log.is_file() else "(no server log)"
    return "\n".join(["page:", body_text(driver)[-600:], "console errors:", *console[-20:], "server log:", server])


def submit_run(driver: WebDriver, runs: Callable[[], list[FlowRun]], ws: Path, tries: int = 3) -> list[FlowRun]:
    """Click Submit until ``runs()`` finds the created run; again only after the server answered 503.

    Prefect's server answers 503 for errors a client can retry (SQLite busy: nothing was written), and its Python
    client retries them; the UI shows "Oops. Something went wrong." and keeps the form filled, so a user clicks
    Submit again. Any other failure is not retried.
    """
    console: list[str] = []
    for _ in range(tries):
        click(driver, button("Submit"))
        deadline = time.monotonic() + 120  # a loaded machine: the server may take a while (SQLite waits 30 s)
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if created := runs():
                return created
            errors = console_errors(driver)
            console += errors
            if any("create_flow_run" in line and "status of 503" in line for line in errors):
                break  # retryable: submit the same form again
        else:
            break
    raise AssertionError(f"the Custom run form created no run\n{what_went_wrong(driver, ws, console)}")


def next_0200_utc(zone: str) -> str:
    """The next 02:00 in ``zone`` as the UI prints it in a UTC browser (``2026/11/24 01:00:00 AM``)."""
    now = datetime.now(ZoneInfo(zone))
    run = now.replace(hour=2, minute=0, second=0, microsecond=0)
    if run <= now:
        run = (now + timedelta(days=1)).replace(hour=2, minute=0, second=0, microsecond=0)
    return run.astimezone(UTC).strftime("%Y/%m/%d %I:%M:%S %p")


def test_ui_shows_the_schedule_and_a_custom_run_completes(browser: WebDriver, tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, TIMEZONE)
    params = (ws / "params.yaml").read_text()
    assert "  source: data/demo" in params
    assert "  max_reject_fraction: 0.25 " in params
    mine = params.replace("  source: data/demo", "  source: data/mine", 1)
    # the params file: a value the code default (0.25) would silently replace
    (ws / "params-mine.yaml").write_text(mine.replace("  max_reject_fraction: 0.25 ", "  max_reject_fraction: 0.4 ", 1))
    # The scheduler creates the next nightly run on its next loop (60 s by default): every 2 s here. The server logs
    # the errors it answers with 503 ("retry"), so a failure below shows their cause.
    loop_and_log = {
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",
    }
    service: Served = start_serve(ws, tmp_path, env=loop_and_log)
    try:
        service.wait_ready()
        ui = service.api_url.removesuffix("/api")

        browser.get(f"{ui}/deployments")
        wait_for_text(browser, "nightly-retrain")
        wait_for_text(browser, "At 02:00 AM every day")
        click(browser, link("nightly-retrain"))
        wait_for_text(browser, "lesionflow.flows.pipeline.training_pipeline")
        expected = f"Scheduled for {next_0200_utc(TIMEZONE)}"
        deadline = time.monotonic() + 60
        while expected not in body_text(browser) and time.monotonic() < deadline:
            time.sleep(2)
            browser.refresh()
        assert expected in body_text(browser)  # 02:00 in Europe/Berlin, shown in the browser's UTC
        browser.save_screenshot(str(tmp_path / "nightly-retrain.png"))

        # Custom run of ingest with params_file changed (params-mine.yaml points at the only data there is) and one
        # key of the quality section: quality.raw.min_cases.
        browser.get(f"{ui}/deployments")
        click(browser, link("ingest"))
        wait_for_text(browser, "lesionflow.flows.ingest.ingest_flow")
        click(browser, button("Run"))
        click(browser, link("Custom run", exact=False))
        wait_for_text(browser, "params_file")
        field = WebDriverWait(browser, 30).until(
            lambda d: next(
                (t for t in d.find_elements(By.TAG_NAME, "textarea") if t.get_attribute("value") == "params.yaml"), None
            )
        )
        assert field is not None
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys("params-mine.yaml")
        assert field.get_attribute("value") == "params-mine.yaml"
        click(browser, button("QualityOverrides"))  # open the section (it starts as None: params.yaml as it is)
        min_cases = WebDriverWait(browser, 30).until(lambda d: form_input(d, "Min Cases (Optional)"))
        reject = form_input(browser, "Max Reject Fraction (Optional)")
        assert min_cases is not None
        assert reject is not None
        assert (min_cases.get_attribute("value"), reject.get_attribute("value")) == ("", "")  # nothing pre-filled
        min_cases.send_keys("1")
        assert min_cases.get_attribute("value") == "1"
        browser.save_screenshot(str(tmp_path / "custom-run-form.png"))
        # The UI goes back to the deployment page with a toast; the run is the one carrying the changed value.
        with service.client() as client:
            created = submit_run(
                browser,
                lambda: [r for r in client.read_flow_runs() if r.parameters.get("params_file") == "params-mine.yaml"],
                ws,
            )
            assert len(created) == 1, [r.id for r in created]
            run_id = created[0].id
        browser.get(f"{ui}/runs/flow-run/{run_id}")
        deadline = time.monotonic() + 150
        while (
            not any(s in body_text(browser) for s in ("Completed", "Failed", "Crashed")) and time.monotonic() < deadline
        ):
            time.sleep(2)
            browser.refresh()
        browser.save_screenshot(str(tmp_path / "custom-run.png"))
        assert "Completed" in body_text(browser), body_text(browser)[:2000]
        with service.client() as client:  # the page may show a task run's "Completed" before the flow run's
            run = client.read_flow_run(run_id)
            while not (run.state is not None and run.state.is_final()) and time.monotonic() < deadline + 60:
                time.sleep(1)
                run = client.read_flow_run(run_id)
        assert run.parameters["workspace"] == str(ws)  # the deployment's value, untouched by the form
        assert run.parameters["quality"] == {"raw": {"min_cases": 1}}  # the one key typed in, nothing else
        assert run.state is not None
        assert run.state.is_completed()
        assert (ws / "data" / "raw" / "manifest.csv").exists()
        # the quality section the gate ran with (its stage record): params-mine.yaml's, but for the key typed in
        record = read_record(Workspace.at(ws), "validate-raw")
        assert record is not None
        expected = load_params(ws / "params-mine.yaml").quality.model_dump(mode="json")
        expected["raw"]["min_cases"] = 1
        used = record["state"]["params"]["quality"]
        assert used == expected
        assert used["max_reject_fraction"] == 0.4
        assert (tmp_path / "custom-run.png").stat().st_size > 10_000
    finally:
        browser.save_screenshot(str(tmp_path / "last-page.png"))  # what the browser showed last, pass or fail
        assert service.stop() == 0, service.text()

"""The dashboard in a real browser (headless Chromium driven by Playwright) against the real server:
`tunesmith serve <tiny model> --jobs DIR` with an API key, so the login is part of the flow.

Log in, upload data and create a job from the form, watch the loss curve get points, run the
comparison and read its table, chat with the base and the tuned model side by side, export the
merged model, create a second job and cancel it. Screenshots go to $TUNESMITH_ARTIFACTS (default
tests/artifacts/); the job page's is also docs/img/job-page.png for the README.

Skipped, with what is missing named, without Playwright's Python package or /usr/bin/chromium
(`make test` installs Debian's chromium when it runs as root). Nothing leaves 127.0.0.1.
tests/jobs_server.py starts the server, as for the openai-client and restart tests.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from jobs_server import KEY

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("TUNESMITH_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("TUNESMITH_ARTIFACTS") or ROOT / "tests" / "artifacts")
README_SHOT = ROOT / "docs" / "img" / "job-page.png"
TIMEOUT_MS = 180_000  # a tiny training subprocess, or a comparison, on a busy CI machine


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright's Python package (pip install 'tunesmith[test]')"
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} (apt-get install chromium, or set $TUNESMITH_CHROMIUM)"
    return None


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_missing() is not None, reason=f"browser test needs {_missing()}")]


def write_data(root: Path) -> dict:
    """The demo's order-extraction chats: a training and a validation file."""
    from conftest import write_jsonl
    from tunesmith.demo.orders import make_splits

    splits = make_splits(5, {"train": 16, "validation": 4})
    return {k: write_jsonl(root / f"{k}.jsonl", v) for k, v in splits.items()}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    from jobs_server import Server

    root = tmp_path_factory.mktemp("jobs-browser")
    data = write_data(root)
    srv = Server(tiny_model_dir, root / "jobs", key=KEY)
    with srv:
        yield {"base": srv.url, "train": data["train"], "valid": data["validation"]}
    if ARTIFACTS.is_dir():
        shutil.copy2(srv.log, ARTIFACTS / "server.log")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def login(page, base: str) -> None:
    page.goto(base + "/")
    page.fill("#key", "wrong")
    page.click("button[type=submit]")
    page.wait_for_selector("text=not this server's API key")
    page.fill("#key", KEY)
    page.click("button[type=submit]")
    page.wait_for_selector("#view-jobs:not([hidden])")


def upload(page, path: Path) -> str:
    """Upload through the form; the new file is selected as the training file."""
    page.eval_on_selector("#upload-status", "n => { delete n.dataset.file; }")
    page.set_input_files("#upload", str(path))
    page.wait_for_selector("#upload-status[data-file]", timeout=TIMEOUT_MS)
    file_id = page.get_attribute("#upload-status", "data-file")
    assert page.input_value("#training_file") == file_id
    return file_id


def open_advanced(page) -> None:
    page.eval_on_selector_all("#advanced, #advanced details", "ds => ds.forEach((d) => { d.open = true; })")


def set_config(page, key: str, value) -> None:
    page.locator(f'[data-key="{key}"]').fill(str(value))


def create_job(page, base: str, train: Path, valid: Path | None, steps: int, suffix: str) -> str:
    page.goto(base + "/#/new")
    page.wait_for_selector('[data-key="train.max_steps"]', state="attached")
    if valid is not None:
        valid_id = upload(page, valid)
    upload(page, train)
    page.select_option("#validation_file", valid_id if valid is not None else "")
    page.fill("#suffix", suffix)
    page.fill("#hp-batch_size", "2")
    page.fill("#hp-learning_rate_multiplier", "50")  # a random tiny model: a curve that visibly falls
    open_advanced(page)
    set_config(page, "train.max_steps", steps)
    set_config(page, "train.eval_every", 2 if valid is not None else "")
    set_config(page, "method.r", 4)
    page.click("#create")
    page.wait_for_function("() => location.hash.startsWith('#/jobs/') || !document.getElementById('form-error').hidden",
                           timeout=30_000)
    assert "#/jobs/ftjob-" in page.url, f"the server refused the job: {page.text_content('#form-error')}"
    return page.url.rsplit("/", 1)[-1]


def job_state(page, base: str, job_id: str) -> str:
    """The job and its log's end, for a failure message."""
    job = page.context.request.get(f"{base}/v1/fine_tuning/jobs/{job_id}").text()
    log = page.context.request.get(f"{base}/ui/api/jobs/{job_id}/log?tail=30").text()
    return f"job: {job}\nlog: {log}"


def wait_on_job(page, base: str, job_id: str, fn: str, timeout: int = TIMEOUT_MS) -> None:
    """Until the page's `fn` holds; a job that fails first fails the test at once, with its error."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(fn):
        status = page.context.request.get(f"{base}/v1/fine_tuning/jobs/{job_id}").json()["status"]
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            pytest.fail(f"waiting for {fn}: the job is {status}\n{job_state(page, base, job_id)}")
        page.wait_for_timeout(500)


def test_dashboard_flow(server, browser):
    base = server["base"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    timings: dict[str, float] = {}
    t0 = time.time()

    login(page, base)
    shot(page, "01-jobs-empty")

    # a field the server refuses comes back as the API says it
    page.goto(base + "/#/new")
    page.wait_for_selector('[data-key="train.max_steps"]', state="attached")
    upload(page, server["train"])
    open_advanced(page)
    page.locator('[data-key="method.name"]').select_option('"full"')
    page.click("#create")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "adapter" in page.text_content("#form-error")
    page.locator('[data-key="method.name"]').select_option("")
    shot(page, "02-new-job-error")

    job_id = create_job(page, base, server["train"], server["valid"], steps=10, suffix="browser")
    timings["created"] = time.time() - t0
    wait_on_job(page, base, job_id, "() => +document.getElementById('chart-loss').dataset.points >= 2")
    timings["curve"] = time.time() - t0
    wait_on_job(page, base, job_id, "() => !!document.querySelector('#job-status.succeeded')")
    timings["succeeded"] = time.time() - t0
    page.wait_for_function("() => document.querySelectorAll('#chart-loss circle.valid').length >= 1",
                           timeout=30_000)
    assert int(page.get_attribute("#chart-lr", "data-points")) == 10  # every step's learning rate
    assert page.locator("#audits table.audit").count() == 2  # training and validation files
    assert page.text_content("#log").strip()

    page.click("#btn-compare")
    page.wait_for_selector("#compare-table tbody tr", timeout=TIMEOUT_MS)
    timings["compared"] = time.time() - t0
    assert "validation" in page.text_content("#compare-table")
    assert "forgetting" in page.text_content("#compare").lower()
    report = page.context.request.get(f"{base}/ui/jobs/{job_id}/report")
    assert report.ok and "<html" in report.text()

    page.fill("#chat-input", "What is 2 plus 1?")
    page.click("#chat-send")
    page.wait_for_selector("#chat-base .reply", timeout=60_000)
    page.wait_for_selector("#chat-tuned .reply", timeout=60_000)
    assert page.locator("#chat-base .error, #chat-tuned .error").count() == 0

    page.click("#btn-merged")
    done = '#tasks tr[data-kind="export"][data-status="succeeded"] a[download]'
    page.wait_for_selector(done, timeout=TIMEOUT_MS)
    timings["exported"] = time.time() - t0
    names = page.locator(done).all_text_contents()
    assert "config.json" in names or any(n.endswith(".safetensors") for n in names)
    shot(page, "03-job-page")
    README_SHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(README_SHOT), full_page=True)

    second = create_job(page, base, server["train"], None, steps=5000, suffix="cancel-me")
    page.wait_for_selector("#btn-cancel:not([disabled])")
    page.click("#btn-cancel")
    page.wait_for_selector("#job-status.cancelled", timeout=60_000)
    assert "Validation file" not in page.text_content("#job-facts")  # none picked: none sent
    assert page.locator("#audits h3").count() == 1
    shot(page, "04-cancelled")

    page.goto(base + "/#/")
    page.wait_for_selector(f'tr[data-job="{second}"]')
    assert "cancelled" in page.text_content(f'tr[data-job="{second}"]')
    assert "succeeded" in page.text_content(f'tr[data-job="{job_id}"]')
    shot(page, "05-jobs")
    assert not errors, errors
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})

"""The web pages in a real headless Chromium (Debian's chromium + chromium-driver, via selenium).

Log in, search by line and time range, open a call, play it, seek to the middle, download with
the verification file, find that access in the access log; a QA user is refused auditors'
pages; a wrong password is refused and repeated failures are slowed. Takes the screenshots of
the search and call pages; ``UPDATE_SCREENSHOTS=1`` copies them to docs/ (the README's).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from central.cli import main
from central.home import Home
from central.web.app import create_app

from .central_helpers import RATE, Box, known_signal
from .web_helpers import PASSWORDS, add_users

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (scripts/bootstrap.sh)")
DOCS = Path(__file__).resolve().parents[2] / "docs"


def screenshot(driver, folder: Path, name: str) -> None:
    path = folder / name
    driver.save_screenshot(str(path))
    assert path.read_bytes().startswith(b"\x89PNG\r\n")
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS / name)
# Long enough (3 min at 8 kHz: 2.9 MB of WAV) that seeking to the middle fetches a new range.
FRAMES = RATE * 180 + 123


@pytest.fixture()
def server(home: Home, box: Box, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import uvicorn

    from .web_helpers import build_archive

    build_archive(home, box)
    intake_signal = known_signal(FRAMES, seed=5)
    from central.receiver import SegmentIntake
    from linerec_contract.protocol import segment_topic
    from linerec_contract.segment import encode_wire

    intake = SegmentIntake(home)
    for seg in box.seal_call("c-3min", intake_signal, 4, line="line-3",
                             sensitive={"direction": "inbound", "caller_id": {"number": "0407"},
                                        "masked_digits": 4}):
        assert intake.handle(segment_topic(seg.device_id, seg.seq), encode_wire(seg)).ack is not None
    if intake.index is not None:
        intake.index.close()
    add_users(home, monkeypatch)
    config = uvicorn.Config(create_app(home), host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(500):
        if srv.started:
            break
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[object]:
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def log_in(driver, base: str, user: str, password: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{base}/login")
    driver.find_element(By.ID, "user").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()
    # the form posts and the answer replaces the page: a results table or an error
    wait_for(lambda: driver.find_elements(By.ID, "error") or "/login" not in driver.current_url,
             "the login answer")


def wait_for(check, what: str, tries: int = 300):  # polls; never asserts how long it took
    for _ in range(tries):
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_browser_flow(server: str, browser, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    driver, base = browser, server
    log_in(driver, base, "aud", PASSWORDS["aud"])
    assert driver.current_url.endswith("/calls"), driver.page_source[:1500]
    # search by line and time range
    driver.find_element(By.ID, "f-line").send_keys("line-3")
    driver.find_element(By.ID, "f-since").send_keys("2023-11-14T22:00Z")
    driver.find_element(By.ID, "f-until").send_keys("2023-11-15")
    driver.find_element(By.ID, "go").click()
    wait_for(lambda: "line=line-3" in driver.current_url, "the search results")
    rows = driver.find_elements(By.CSS_SELECTOR, "#results tr")[1:]
    assert [r.find_elements(By.TAG_NAME, "td")[3].text for r in rows] == ["c-3min"]
    screenshot(driver, tmp_path, "web-search.png")
    driver.find_element(By.LINK_TEXT, "c-3min").click()
    wait_for(lambda: driver.find_elements(By.ID, "verification"), "the call page")
    assert driver.find_element(By.ID, "verification").text.startswith("ok")
    assert driver.find_element(By.ID, "caller").text == "0407"
    assert driver.find_element(By.ID, "digits").text == "masked by the box (4)"
    # play: a reason first, then the player
    driver.find_element(By.ID, "listen-reason").send_keys("QA review of ticket 7")
    driver.find_element(By.ID, "listen").click()
    wait_for(lambda: driver.find_elements(By.ID, "audio"), "the player")
    caplog.set_level(logging.INFO, logger="central.web.audio")
    duration = driver.execute_async_script(
        "const a = document.getElementById('audio'), done = arguments[arguments.length - 1];"
        "if (a.readyState >= 3) { done(a.duration); return; }"
        "a.addEventListener('canplay', () => done(a.duration), {once: true}); a.load();")
    assert abs(duration - FRAMES / RATE) <= 0.05, duration
    driver.execute_script("window.scrollTo(0, 0)")
    screenshot(driver, tmp_path, "web-call.png")
    # seek to the middle: the player asks for a byte range there and gets 206
    caplog.clear()
    seeked = driver.execute_async_script(
        "const a = document.getElementById('audio'), done = arguments[arguments.length - 1];"
        "a.addEventListener('seeked', () => done(a.currentTime), {once: true});"
        "a.currentTime = a.duration / 2;")
    assert abs(seeked - FRAMES / RATE / 2) < 0.1
    middle_bytes = 44 + FRAMES  # the WAV's middle, in bytes (16-bit mono, 44-byte header)
    served = wait_for(lambda: [r.getMessage() for r in caplog.records if ": 206 (range bytes=" in
                               r.getMessage()], "a 206 after the seek")
    starts = [int(m.split("range bytes=")[1].split("-")[0]) for m in served]
    # Chromium asks from a 32 KiB-aligned block before the point; the file is 2.9 MB
    assert any(abs(s - middle_bytes) < 65536 for s in starts), served
    # download with the verification file
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    driver.find_element(By.ID, "download-reason").send_keys("dispute 42")
    driver.find_element(By.ID, "download").click()
    zip_path = wait_for(lambda: (downloads / "c-3min.zip").is_file() and downloads / "c-3min.zip",
                        "the download")
    with zipfile.ZipFile(zip_path) as z:
        pcm, rate = sf.read(io.BytesIO(z.read("c-3min.wav")), dtype="int16")
        proof = json.loads(z.read("c-3min.wav.verification.json"))
        z.extractall(downloads)
    assert rate == RATE and np.array_equal(pcm, known_signal(FRAMES, seed=5))
    assert proof["audio"]["frames"] == FRAMES and proof["exported_by"] == "aud"
    assert main(["check-export", str(downloads / "c-3min.wav")]) == 0
    # and that access is in the access log
    driver.get(f"{base}/access-log")
    cells = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
             for tr in driver.find_elements(By.CSS_SELECTOR, "#access tr")[1:]]
    assert ["aud", "export", "c-3min", "box-1", "dispute 42"] in [c[2:7] for c in cells]
    assert ["aud", "play", "c-3min", "box-1", "QA review of ticket 7"] in [c[2:7] for c in cells]
    assert driver.find_element(By.ID, "chain").text == "Chain intact."
    # a QA user is refused the auditors' pages
    log_in(driver, base, "ann", PASSWORDS["ann"])
    driver.get(f"{base}/access-log")
    assert "needs the auditor role" in driver.find_element(By.ID, "error").text
    # a wrong password is refused; repeated failures are slowed (counted, not timed)
    messages = []
    for _ in range(4):
        log_in(driver, base, "adm", "not-the-password")
        messages.append(driver.find_element(By.ID, "error").text)
    assert messages[:3] == ["wrong user name or password"] * 3
    assert messages[3].startswith("too many failed logins")
    log_in(driver, base, "adm", PASSWORDS["adm"])
    assert driver.current_url.endswith("/login") or "/login" in driver.current_url
    assert driver.find_element(By.ID, "error").text.startswith("too many failed logins")

"""The browser client (clients/web) in a real headless Chromium against a real server: espeak speech as
the fake microphone, the fake camera on, Playwright driving Debian's /usr/bin/chromium (never a
downloaded browser). The page must hear the question (its microphone meter moves, and the server's input
transcription of it appears on the page), show the model in use, show an answer and play its audio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from tests.conftest import API_KEY
from tests.speech import compose

pytestmark = pytest.mark.vllm

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
RATE = 48_000

# As the machine notes require: a closed network makes Chromium's background connections fail noisily.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",  # also gives the fake camera (a moving test pattern)
]


@pytest.fixture(scope="session")
def sync_playwright():
    """Playwright's sync API, once Chromium is known to be there. Session-scoped and listed first, so a
    missing browser fails the test before the server fixture spends its start-up time."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser test needs Debian's Chromium "
            "(apt-get install -y chromium chromium-driver)", pytrace=False
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install playwright "
                    "(the Python package only; it drives /usr/bin/chromium, no browser download)", pytrace=False)
    return sync_playwright


def test_browser_hears_a_question_and_plays_the_answer(sync_playwright, server_url: str, tmp_path: Path) -> None:
    # A question, then silence so the server's VAD ends the segment; played once (%noloop).
    audio, _ = compose([("silence", 1.5), ("speech", "What is the weather like today?"), ("silence", 6.0)],
                       sample_rate=RATE)
    wav = tmp_path / "question.wav"
    sf.write(wav, audio, RATE, subtype="PCM_16")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "browser.png"
    shot.unlink(missing_ok=True)

    from playwright.sync_api import TimeoutError as PageTimeout

    console: list[str] = []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh, empty profile
            executable_path=str(CHROMIUM),
            headless=True,
            args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}%noloop"],
            viewport={"width": 1100, "height": 760},
        )
        try:
            page = context.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(server_url + "/")
            assert page.title() == "VITA duplex"
            page.fill("#key", API_KEY)
            page.check("#camera")
            page.click("#connect")

            def state() -> dict:
                return page.evaluate("() => JSON.parse(JSON.stringify(window.vitaState))")

            try:
                page.wait_for_function(
                    """() => vitaState.speechStarted > 0
                        && vitaState.segments.some(s => s.kind === "query" && !s.ignored)
                        && vitaState.transcript.trim().length > 0
                        && vitaState.audioSamplesPlayed > 0
                        && Object.values(vitaState.userTranscripts).some(t => t.trim().length > 0)""",
                    timeout=120_000,
                )
                # Let a little more of the answer play, then a typed message goes the same way.
                page.wait_for_function("() => vitaState.audioSamplesPlayed > 24000", timeout=30_000)
                page.fill("#text", "And tomorrow?")
                page.click("#send")
                # Typed turns are classified too (this tiny model calls every turn a query).
                page.wait_for_function("() => vitaState.segments.length >= 2", timeout=60_000)
            except PageTimeout:
                page.screenshot(path=str(shot), full_page=True)
                pytest.fail(f"page state: {json.dumps(state())[:3000]}\nconsole:\n" + "\n".join(console[-40:]))
            page.screenshot(path=str(shot), full_page=True)
            final = state()
            transcript_html = page.inner_text("#transcript")
            answers = page.locator("#transcript li.assistant").all_inner_texts()
            heard = page.locator("#transcript li.user.heard").all_inner_texts()
            state_label = page.inner_text("#state")
            model_label = page.inner_text("#model")
        finally:
            context.close()

    assert shot.is_file() and shot.stat().st_size > 10_000
    assert final["errors"] == [], final["errors"]
    assert final["framesSent"] > 0  # the fake camera's frames went out as vita.frame.append
    assert final["audioSamplesPlayed"] > 24000  # over a second of the answer was rendered
    assert final["transcript"].strip() and answers and answers[0].strip()  # the answer is on the page
    assert "And tomorrow?" in transcript_html
    assert state_label != "disconnected"
    # What the user said, as pocketsphinx heard the espeak question, is on the page as the user's turn.
    said = [t for t in final["userTranscripts"].values() if t.strip()]
    assert said and said[0] in heard, (final["userTranscripts"], heard)
    assert model_label.strip() == final["model"] != ""  # the model in use, from session.created
    assert final["micPeak"] > 0.01  # the meter saw the question (espeak speech peaks far above this)

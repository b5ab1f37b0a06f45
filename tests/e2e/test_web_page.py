"""The upload page (``GET /``) in a real headless browser against a real Serve app on a local Ray.

Debian's chromium driven by Playwright (its wheel ships the driver; no browser is downloaded). One app, one
browser page and one key-less start for the whole module; tests run in file order and share the page: the 401
first, then predictions, the referral notice, the heatmap, the screenshots, the error paths (the out-of-distribution
refusal among them), and last the check that every request the page made stayed on the app's origin. The app's
ensemble.yaml holds an out-of-distribution check fitted on the session's tiny shards and a referral floor. Without
chromium the module skips, except under CI where it fails.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.helpers import CONFIG, ROOT, SPACES, free_port, make_dicom, png, require_program, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.slow]

WEB_DIR = ROOT / "serve" / "web"
CHROMIUM = Path("/usr/bin/chromium")
API_KEY = "web-key-456"
KEY_ENV = "CXR_WEB_TEST_API_KEY"
MAX_UPLOAD_MB = 0.5
SCREENSHOT_COPY = Path("/tmp/cxr-web.png")
TIMEOUT_MS = 30_000
# the app's referral floor: an answer scored on the nih14 head alone is never below it (min over findings of
# max(p, 1 - p)), one scored on every head of these untrained models is (their covid head is far less sure)
REFER_BELOW = 0.5


@pytest.fixture(scope="module")
def needs_browser() -> None:
    """Skip without chromium or Playwright, except under CI, which must really run this module."""
    require_program(str(CHROMIUM), "the web page test drives it with Playwright", "apt-get install -y chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        message = "playwright is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {message}")
        pytest.skip(message)


@pytest.fixture(scope="module")
def app(needs_browser, ray_session, tiny_checkpoints, tiny_shards, tmp_path_factory):
    """The Serve app on 127.0.0.1 with an API key (resolved after the browser check, so a skip starts no Ray), its
    run's ensemble.yaml as stage B leaves one: the default gate, the referral floor and an out-of-distribution check
    fitted on the tiny shards (radiograph-like uploads pass it, noise does not)."""
    from ray import serve

    from pipelines.artifacts import write_settings
    from pipelines.config import load_config
    from serve.app import build_app
    from tune.ood_fit import fit_ood_check

    run = tmp_path_factory.mktemp("web") / "run"
    record = fit_ood_check(load_config(None, sets=["data.storage_size=32", f"data.shards_dir={tiny_shards}"]), run)
    write_settings(run / "ensemble.yaml", 0.4, 0.85, refer_below=REFER_BELOW, ood=record)
    sets = [
        f"train.run_dir={run}",
        f"serve.api_key_env={KEY_ENV}",
        f"serve.max_upload_mb={MAX_UPLOAD_MB}",
        "serve.request_timeout_s=20",
        "serve.router={num_cpus: 0.4, max_ongoing_requests: 8, max_queued_requests: 8}",
        "serve.cnn={min_replicas: 1, initial_replicas: 1, max_replicas: 1, num_cpus: 0.4, num_gpus: 0}",
        "serve.vit={min_replicas: 1, initial_replicas: 1, max_replicas: 1, num_cpus: 0.4, num_gpus: 0}",
    ]
    cfg = load_config(CONFIG, None, sets)
    cnn, vit = tiny_checkpoints["cnn"], tiny_checkpoints["vit"]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg, cnn, vit, api_key=API_KEY), name="cxr", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def browser(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, app):
    """One tab for the module, opened without a key; every URL it requests is kept for the last test."""
    tab = browser.new_page(viewport={"width": 1280, "height": 900})
    tab.set_default_timeout(TIMEOUT_MS)
    tab.requested = []
    tab.on("request", lambda request: tab.requested.append(request.url))
    tab.goto(app + "/")
    yield tab
    tab.close()


@pytest.fixture(scope="module")
def xray(tmp_path_factory) -> Path:
    """A radiograph-like 8-bit PNG of the tiny shards' kind, 256 px: the app's out-of-distribution check passes it."""
    path = tmp_path_factory.mktemp("images") / "chest.png"
    path.write_bytes(png(256))
    return path


def upload(page, path: Path, endpoint: str = "/v1/predict"):
    """Choose ``path`` in the file input (the page sends it at once); the page's own response."""
    with page.expect_response(lambda response: endpoint in response.url) as answer:
        page.set_input_files("#file", str(path))
    return answer.value


def shown_bars(page, head_list: str) -> list[dict]:
    return page.eval_on_selector_all(
        f"#{head_list} .bar",
        """buttons => buttons.map(b => ({label: b.dataset.label, p: Number(b.dataset.p),
            text: b.querySelector('.bar-value').textContent, hit: b.classList.contains('hit'),
            top: b.classList.contains('top'), pressed: b.getAttribute('aria-pressed') === 'true'}))""",
    )


def error_text(page) -> str:
    page.wait_for_selector("#error", state="visible")
    return page.inner_text("#error")


def wait_text(page, element_id: str, text: str) -> None:
    """Until the element's text is ``text`` (the page draws an answer a moment after its response arrives)."""
    page.wait_for_function("([id, text]) => document.getElementById(id).textContent === text", arg=[element_id, text])


# ------------------------------------------------------------------------------------------- page and key


def test_page_and_its_assets_are_served_locally(app):
    index = requests.get(app + "/", timeout=10)
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    for name in ("app.js", "api.js", "result.js", "style.css"):
        assert f'"static/{name}"' in index.text
        assert requests.get(f"{app}/static/{name}", timeout=10).status_code == 200
    for path in WEB_DIR.rglob("*"):
        if path.is_file():
            assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", path.read_text()), f"{path.name} links out"
    links = re.findall(r"""(?:src|href)=["']([^"']+)""", index.text)
    assert links and all(link.startswith(("static/", "data:")) for link in links), links


def test_missing_then_wrong_key_shows_the_401_and_the_key_field(page, xray):
    page.wait_for_selector("#key-section", state="visible")  # GET /v1/model answered 401
    answer = upload(page, xray)
    assert answer.status == 401
    assert "401 unauthorized" in error_text(page) and "API key" in page.inner_text("#error")
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.fill("#api-key", "not-the-key")
    with page.expect_response(lambda response: "/v1/predict" in response.url) as wrong:
        page.press("#api-key", "Enter")
    assert wrong.value.status == 401 and "401 unauthorized" in error_text(page)
    assert page.evaluate("sessionStorage.getItem('cxr-api-key')") == "not-the-key"
    assert page.evaluate("localStorage.length") == 0
    page.fill("#api-key", API_KEY)
    with page.expect_response(lambda response: "/v1/predict" in response.url) as right:
        page.click("#key-form button")
    assert right.value.status == 200
    page.wait_for_selector("#results", state="visible")
    assert page.is_hidden("#error")
    page.wait_for_function("document.getElementById('versions').textContent.includes('cnn: ')")


# ------------------------------------------------------------------------------------------- results


def test_bars_and_numbers_are_what_the_api_answers(page, app, xray):
    answer = upload(page, xray)
    body = answer.json()
    assert answer.status == 200 and "mode=adaptive" in answer.url and "head=" not in answer.url
    page.wait_for_selector("#bars-nih14 .bar >> nth=13")
    again = requests.post(
        app + "/v1/predict", files={"file": ("chest.png", xray.read_bytes())}, headers={"X-API-Key": API_KEY}
    ).json()
    # one block per head of the model, in its order, every head drawn in the same loop (pneumonia too)
    shown = page.eval_on_selector_all("#heads section.head", "blocks => blocks.map(b => b.dataset.head)")
    assert shown == body["heads"] == [space.head for space in SPACES]
    for space in SPACES:
        head = space.head
        bars = shown_bars(page, f"bars-{head}")
        assert len(bars) == len(space.classes)
        probs = [bar["p"] for bar in bars]
        assert probs == sorted(probs, reverse=True)
        assert {bar["label"]: bar["p"] for bar in bars} == body[head]["probabilities"]
        for bar in bars:
            assert bar["p"] == pytest.approx(again[head]["probabilities"][bar["label"]], abs=1e-6)
            assert abs(float(bar["text"].rstrip("%")) - bar["p"] * 100) <= 0.05 + 1e-9, bar
        if space.multi_label:
            findings = body[head]["findings"]
            assert [bar["label"] for bar in bars if bar["hit"]] == [b["label"] for b in bars if b["label"] in findings]
        else:
            assert [bar["label"] for bar in bars if bar["top"]] == [body[head]["top_class"]]
        binary = body[head]["binary"]
        assert page.locator(f"#binary-{head}").count() == (binary is not None)
        if binary is not None:  # e.g. "abnormal: yes (a finding is reported); p = 61.2%", "pneumonia: no; p = 40.3%"
            text = page.text_content(f"#binary-{head}")
            assert text.startswith(f"{binary['name']}: {'yes' if binary['positive'] else 'no'}")
            assert f"{binary['probability'] * 100:.1f}%" in text
    nih = shown_bars(page, "bars-nih14")
    assert nih[0]["pressed"], "the top finding is selected by default"
    used = ",".join(body["models_used"])
    assert page.get_attribute("#models-used", "data-models") == used == ",".join(again["models_used"])
    assert float(page.get_attribute("#cnn-confidence", "data-value")) == body["cnn_confidence"]
    gate = page.inner_text("#gate")
    assert f"threshold {body['gate']['threshold']}" in gate and f"{body['cnn_confidence']:.3f}" in gate
    assert ("escalated to the ViT" in gate) == body["gate"]["escalated"]
    assert float(page.get_attribute("#latency", "data-total")) == body["latency_ms"]["total"]
    latency = page.inner_text("#latency")
    assert f"{body['latency_ms']['total']:.1f} ms" in latency and "decode" in latency
    assert page.inner_text("#input-info").startswith("PNG, 256×256")
    ood = body["ood"]  # the image check: passed, and said so with its numbers
    assert ood["checked"] and ood["score"] <= ood["threshold"] and page.get_attribute("#ood", "data-checked") == "true"
    passed = f"score {ood['score']:.2f} ≤ {ood['threshold']:.2f} (looks like the training radiographs)"
    assert page.inner_text("#ood") == passed
    assert page.evaluate("document.getElementById('preview').naturalWidth") == 256


def nih_sorted(body) -> list[str]:
    return [name for name, _ in sorted(body["nih14"]["probabilities"].items(), key=lambda kv: -kv[1])]


def test_mode_and_head_choices_are_sent(page):
    with page.expect_response(lambda response: "/v1/predict" in response.url) as forced:
        page.check("input[name=mode][value=ensemble]")
    assert "mode=ensemble" in forced.value.url
    page.wait_for_function("document.getElementById('models-used').dataset.models === 'cnn,vit'")
    options = page.eval_on_selector_all("#head option", "options => options.map(o => o.value)")
    assert options == ["", *(space.head for space in SPACES)]  # from the model's label spaces (v1/model)
    with page.expect_response(lambda response: "/v1/predict" in response.url) as scored:
        page.select_option("#head", "covid")
    assert "mode=ensemble" in scored.value.url and "head=covid" in scored.value.url
    assert scored.value.json()["gate"]["heads"] == ["covid"]
    with page.expect_response(lambda response: "/v1/predict" in response.url) as third:
        page.select_option("#head", "pneumonia")
    assert "head=pneumonia" in third.value.url and third.value.json()["gate"]["heads"] == ["pneumonia"]
    with page.expect_response(lambda response: "/v1/predict" in response.url) as vit:
        page.check("input[name=mode][value=vit]")
    assert vit.value.json()["models_used"] == ["vit"]
    page.wait_for_function("document.getElementById('gate').textContent.includes('no CNN answer')")
    # back to the defaults for the tests after this one, by keyboard: arrow keys move within the radio group
    page.focus("input[name=mode][value=vit]")
    with page.expect_response(lambda response: "/v1/predict" in response.url):
        page.keyboard.press("ArrowLeft")
    with page.expect_response(lambda response: "/v1/predict" in response.url):
        page.keyboard.press("ArrowLeft")
    assert page.is_checked("input[name=mode][value=adaptive]")
    with page.expect_response(lambda response: "/v1/predict" in response.url) as reset:
        page.select_option("#head", "")
    assert "mode=adaptive" in reset.value.url and "head=" not in reset.value.url


def test_the_referral_notice_follows_the_answer(page, xray):
    referred = upload(page, xray).json()  # scored on every head: the untrained covid head is far below the floor
    assert referred["refer"] and f"floor {REFER_BELOW:.3f}" in referred["refer_reason"]
    wait_text(page, "refer-reason", referred["refer_reason"])
    assert page.is_visible("#refer") and page.inner_text("#refer").startswith("Refer to a radiologist:")
    with page.expect_response(lambda response: "/v1/predict" in response.url) as nih:
        page.select_option("#head", "nih14")  # min over findings of max(p, 1 - p): never below 0.5
    assert nih.value.json()["refer"] is False and nih.value.json()["refer_reason"] is None
    page.wait_for_selector("#refer", state="hidden")
    with page.expect_response(lambda response: "/v1/predict" in response.url) as back:
        page.select_option("#head", "")
    assert "head=" not in back.value.url and back.value.json()["refer"]


def test_heatmap_overlay_of_the_selected_label(page, app, xray):
    body = upload(page, xray).json()
    top_finding = nih_sorted(body)[0]
    model = body["models_used"][0] if len(body["models_used"]) == 1 else "ensemble"
    with page.expect_response(lambda response: "/v1/explain" in response.url) as answer:
        page.check("#heatmap")
    assert answer.value.status == 200, answer.value.text()
    assert f"target={top_finding}" in answer.value.url and f"model={model}" in answer.value.url
    page.wait_for_function(
        "(() => { const o = document.getElementById('overlay'); return !o.hidden && o.naturalWidth > 0; })()"
    )
    explained = answer.value.json()
    assert float(page.get_attribute("#explain-info", "data-p")) == explained["probability"]
    assert top_finding in page.inner_text("#explain-info")
    # another label, chosen by keyboard: focus its bar and press Enter
    covid_top = page.locator("#bars-covid .bar").first
    with page.expect_response(lambda response: "/v1/explain" in response.url) as second:
        covid_top.focus()
        page.keyboard.press("Enter")
    assert "head=covid" in second.value.url and second.value.status == 200
    assert covid_top.get_attribute("aria-pressed") == "true"
    page.wait_for_function(
        f"document.getElementById('explain-info').textContent.startsWith({covid_top.get_attribute('data-label')!r})"
    )
    # the third head's bars explain too: a pneumonia class
    pneumonia_top = page.locator("#bars-pneumonia .bar").first
    with page.expect_response(lambda response: "/v1/explain" in response.url) as third:
        pneumonia_top.click()
    assert "head=pneumonia" in third.value.url and third.value.status == 200
    assert third.value.json()["target"] == pneumonia_top.get_attribute("data-label")


def test_screenshots_wide_and_narrow(page, xray, tmp_path):
    if page.is_hidden("#results"):
        upload(page, xray)
        page.wait_for_selector("#results", state="visible")
    wide = tmp_path / "cxr-web.png"
    page.screenshot(path=str(wide), full_page=True)
    shutil.copyfile(wide, SCREENSHOT_COPY)
    page.set_viewport_size({"width": 380, "height": 800})
    narrow = tmp_path / "cxr-web-narrow.png"
    page.screenshot(path=str(narrow), full_page=True)
    shutil.copyfile(narrow, SCREENSHOT_COPY.with_name("cxr-web-narrow.png"))
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "sideways scroll when narrow"
    page.set_viewport_size({"width": 1280, "height": 900})
    for path, min_width in ((wide, 1280), (narrow, 380)):
        with Image.open(path) as shot:
            assert shot.format == "PNG" and shot.width >= min_width and shot.height >= 600
        assert path.stat().st_size > 20_000


def test_dicom_shows_its_name_and_the_overlay_shows_the_image(page, tmp_path):
    # a 16-bit radiograph-like image (a plain gradient would be refused by the image check)
    pixels = np.asarray(Image.open(io.BytesIO(png(128)))).astype(np.uint16) * 257
    path = tmp_path / "chest.dcm"
    path.write_bytes(make_dicom(pixels, modality="DX"))
    assert upload(page, path).status == 200
    page.wait_for_function("document.getElementById('input-info').textContent.startsWith('DICOM, 128×128')")
    assert page.is_hidden("#preview")
    if page.is_checked("#heatmap"):  # the heatmap test ran: the overlay stands in for the missing preview
        page.wait_for_function(
            "(() => { const o = document.getElementById('overlay'); return !o.hidden && o.naturalWidth > 0; })()"
        )
        page.uncheck("#heatmap")
    assert "chest.dcm" in page.inner_text("#no-preview") and "chest.dcm" in page.inner_text("#file-name")


# ------------------------------------------------------------------------------------------- errors


def test_a_non_radiograph_is_refused_with_its_score_then_answered_for_research(page, tmp_path):
    noise = tmp_path / "noise.png"  # decodes fine, but is nothing like a radiograph
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (256, 256), dtype=np.uint8)).save(noise)
    refused = upload(page, noise)
    assert refused.status == 422 and "ood=" not in refused.url
    body, ood = refused.json(), refused.json()["ood"]
    assert ood["refused"] and ood["score"] > ood["threshold"]
    assert "422 not_a_chest_radiograph" in error_text(page) and body["error"]["detail"] in page.inner_text("#error")
    assert f"score {ood['score']:.2f} > threshold {ood['threshold']:.2f}" in page.inner_text("#error-ood")
    assert page.is_hidden("#results")
    # the research switch sends ood=off: answered, and the answer says it was not checked
    with page.expect_response(lambda response: "/v1/predict" in response.url) as research:
        page.check("#ood-off")
    assert research.value.status == 200 and "ood=off" in research.value.url
    answered = research.value.json()["ood"]
    assert answered["checked"] is False and answered["score"] == pytest.approx(ood["score"])
    unchecked = f"not checked (ood=off): score {ood['score']:.2f} > {ood['threshold']:.2f} (unlike the training"
    wait_text(page, "ood", unchecked + " radiographs)")
    assert page.is_visible("#results") and page.is_hidden("#error")
    with page.expect_response(lambda response: "/v1/explain" in response.url) as explained:
        page.check("#heatmap")  # its heatmap is asked for the same way, or the explain would be refused
    assert explained.value.status == 200 and "ood=off" in explained.value.url
    page.uncheck("#heatmap")
    with page.expect_response(lambda response: "/v1/predict" in response.url) as again:
        page.uncheck("#ood-off")
    assert again.value.status == 422 and "ood=" not in again.value.url
    assert "422 not_a_chest_radiograph" in error_text(page) and page.is_visible("#error-ood")


def test_a_text_file_named_png_shows_the_reason(page, tmp_path):
    fake = tmp_path / "x.png"
    fake.write_text("plain text is not an image")
    assert upload(page, fake).status == 415 and "415 unsupported_type" in error_text(page)
    assert page.is_hidden("#results") and page.is_hidden("#error-ood")  # the score line is for refusals only


def test_a_file_over_the_limit_is_warned_about_and_sent(page, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(int(MAX_UPLOAD_MB * 1024 * 1024) + 4096))
    answer = upload(page, big)
    assert "over the server's 0.5 MB limit" in page.inner_text("#warning")
    assert answer.status == 413 and "413 too_large" in error_text(page)


def test_every_request_stayed_on_the_app_origin(page, app):
    assert any(url.startswith(app + "/static/app.js") for url in page.requested)
    outside = [url for url in page.requested if not url.startswith((app + "/", "data:", "blob:"))]
    assert not outside, outside

"""The unit browser driven in a real headless Chromium (selenium + chromedriver) on tiny runs.

Skipped where no Chromium is installed, unless MONOROUTE_REQUIRE_BROWSER=1 (set by .ci/run, which
installs Debian's chromium and chromium-driver), so CI cannot pass without running it.
Set MONOROUTE_SCREENSHOTS=DIR to keep a screenshot of every page.
"""
import os
from pathlib import Path

import pytest

from monoroute.serve.browser import find_chromium, headless_chromium

if find_chromium() is None:
    if os.environ.get("MONOROUTE_REQUIRE_BROWSER") == "1":
        raise RuntimeError("MONOROUTE_REQUIRE_BROWSER=1 but chromium / chromedriver are not installed "
                           "(apt-get install chromium chromium-driver)")
    pytest.skip("no chromium + chromedriver on this machine", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from monoroute.interp.store import AnalysisStore  # noqa: E402
from monoroute.serve.app import create_app  # noqa: E402
from monoroute.serve.cli import BackgroundServer  # noqa: E402


@pytest.fixture(scope="module")
def browser(analysed_runs):
    stores = [AnalysisStore(r).warm() for r in analysed_runs]
    with BackgroundServer(create_app(stores)) as url:
        driver = headless_chromium()
        try:
            yield driver, url, stores
        finally:
            driver.quit()


def wait_for(driver, css: str, timeout: float = 30):
    return WebDriverWait(driver, timeout).until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))


def snap(driver, name: str) -> None:
    folder = os.environ.get("MONOROUTE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def no_page_errors(driver) -> None:
    assert not driver.find_elements(By.CSS_SELECTOR, "#error, .error"), driver.find_element(By.ID, "main").text[:500]
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_overview_search_unit_prompt_and_ablate(browser):
    driver, url, stores = browser
    routed, dense = stores

    # overview: both runs side by side, with their unit sets and the concept table
    driver.get(url + "/#/")
    wait_for(driver, "#concept-table tr td")
    text = driver.find_element(By.ID, "model-table").text
    assert routed.name in text and dense.name in text
    sets = driver.find_element(By.ID, "sets-table").text
    for name in ("routed_units", "dense_neurons", "sae", "transcoder"):
        assert name in sets
    assert len(driver.find_elements(By.CSS_SELECTOR, "#layers-table svg.hist")) >= 4
    no_page_errors(driver)
    snap(driver, "overview")

    # unit list: search narrows the list to units whose concepts / tokens / explanation match
    df = routed.table("routed_units")
    term = df[df.n_firings > 0].iloc[0]["best_concept"]
    expected = int((df.best_concept + "\0" + df.f1_concept + "\0" + df.top_tokens + "\0" + df.explanation)
                   .str.lower().str.contains(term.lower(), regex=False).sum())
    driver.get(url + "/#/units/0/routed_units")
    wait_for(driver, "#unit-table tbody tr")
    box = driver.find_element(By.ID, "search")
    box.clear()
    box.send_keys(term)
    driver.find_element(By.ID, "apply").click()
    WebDriverWait(driver, 30).until(lambda d: f"{expected:,} of" in d.find_element(By.ID, "unit-count").text)
    rows = driver.find_elements(By.CSS_SELECTOR, "#unit-table tbody tr")
    assert 0 < len(rows) <= 50
    no_page_errors(driver)
    snap(driver, "units")

    # sorting by a column header reorders the rows
    driver.find_element(By.CSS_SELECTOR, "#unit-table th[data-col='max_act']").click()
    WebDriverWait(driver, 30).until(lambda d: "sort=max_act" in d.current_url and d.find_elements(By.CSS_SELECTOR, "#unit-table tbody tr"))

    # unit page: top contexts with per-token activation shading and hover values
    first = driver.find_element(By.CSS_SELECTOR, "#unit-table a.unit-link")
    unit = int(first.text)
    first.click()
    wait_for(driver, "#top-contexts .ctx")
    assert f"unit {unit}" in driver.find_element(By.ID, "unit-title").text
    tips = [s.get_attribute("data-tip") for s in driver.find_elements(By.CSS_SELECTOR, "#top-contexts .tok")]
    peak = float(df.max_act[unit])
    assert any(abs(float(t.rsplit(": ", 1)[1]) - peak) < 1e-3 for t in tips)
    assert driver.find_elements(By.CSS_SELECTOR, "#best-concepts tr td")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#boosted tr")) == 11
    no_page_errors(driver)
    snap(driver, "unit")

    # live prompt: type text, see firing units per token, pick one, ablate it
    driver.find_element(By.ID, "try-prompt").click()
    area = wait_for(driver, "#prompt-text")
    area.clear()
    area.send_keys("def f(x):\n    return x")
    driver.find_element(By.ID, "prompt-go").click()
    wait_for(driver, "#prompt-tokens .ptok")
    tokens = driver.find_elements(By.CSS_SELECTOR, "#prompt-tokens .ptok")
    assert len(tokens) == len(routed.tokenizer.encode("def f(x):\n    return x"))
    picks = []
    for tok in tokens:  # find a token with a firing unit
        tok.click()
        picks = driver.find_elements(By.CSS_SELECTOR, "#token-table button.pick")
        if picks:
            break
    assert picks, "no unit fires on any token of the prompt"
    picked = picks[0].get_attribute("data-unit")
    picks[0].click()
    assert driver.find_element(By.ID, "iv-unit").get_attribute("value") == picked
    driver.find_element(By.CSS_SELECTOR, "input[name=iv-kind][value=ablate]").click()
    driver.find_element(By.ID, "iv-apply").click()
    wait_for(driver, "#iv-kl")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#next-before tr")) == 10
    assert len(driver.find_elements(By.CSS_SELECTOR, "#next-after tr")) == 10
    assert float(driver.find_element(By.ID, "iv-kl").text) >= 0
    assert f"Unit {picked}" in driver.find_element(By.ID, "iv-result").text
    no_page_errors(driver)
    snap(driver, "prompt")


def test_sae_latents_in_the_live_prompt_and_a_bad_request_shows_an_error(browser):
    driver, url, _ = browser
    driver.get(url + "/#/prompt/1?set=sae")
    wait_for(driver, "#prompt-text")
    assert driver.find_element(By.ID, "prompt-set").get_attribute("value") == "sae"
    driver.find_element(By.ID, "prompt-go").click()
    wait_for(driver, "#token-table")
    unit = driver.find_element(By.ID, "iv-unit")
    unit.clear()
    unit.send_keys("99999999")
    driver.find_element(By.ID, "iv-apply").click()
    err = wait_for(driver, "#iv-error")
    assert "out of range" in err.text


def test_circuits_task_view_links_units_to_their_pages(analysed_runs, tmp_path):
    import shutil

    from test_serve import write_fake_circuits

    run = tmp_path / "routed"
    shutil.copytree(analysed_runs[0], run)
    store = AnalysisStore(run).warm()
    write_fake_circuits(run, store.layer)
    with BackgroundServer(create_app([store])) as url:
        driver = headless_chromium()
        try:
            driver.get(url + "/#/circuits/0")
            wait_for(driver, "#circuits-table a.circuit-unit")
            text = driver.find_element(By.ID, "circuits-table").text
            assert "quote" in text and "cannot do" in text
            links = driver.find_elements(By.CSS_SELECTOR, "#circuits-table a.circuit-unit")
            assert [a.text for a in links] == [f"L{store.layer}:3", f"L{store.layer}:5"]
            no_page_errors(driver)
            snap(driver, "circuits")
            links[0].click()
            WebDriverWait(driver, 30).until(lambda d: "#/unit/0/routed_units/3" in d.current_url)
            wait_for(driver, "#main h2")
            no_page_errors(driver)
        finally:
            driver.quit()

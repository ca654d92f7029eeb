"""The MLflow UI, opened by a real headless Chromium, shows the student n2n registered.

Needs Debian's ``chromium`` and ``chromium-driver`` packages and the ``selenium`` bindings
(which use the given chromedriver: nothing is downloaded). The screenshot is kept under
``test-artifacts/`` for a person to look at.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mlflow_server import MlflowServer

from envs.models import SmallCNN
from envs.spec import base_spec, teacher_spec
from pipeline.tracking.tracker import CHAMPION_ALIAS, Tracker

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
MODEL_NAME = "n2n-ui-student"

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (test extra)")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed "
    "(apt-get install -y chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A server holding one run whose (untrained, tiny) student is registered as @champion."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        shape = [1, 8, 8]
        spec = teacher_spec(
            base_spec("small_cnn", shape, num_classes=10, in_channels=1, width=0.125)
        )
        torch.manual_seed(0)
        student = SmallCNN(num_classes=10, in_channels=1, width=0.125)
        summary = {"student": {"params": 1234, "test_accuracy": 0.5}, "compression_ratio": 4.0}
        with Tracker(server.url, experiment="ui", registry_name=MODEL_NAME) as tracker:
            tracker.check_reachable()
            tracker.start({"name": "ui"}, {"arch": "small_cnn", "params": 4936}, dataset="digits")
            info = tracker.finish(tmp_path_factory.mktemp("run"), student, spec, summary)
        yield server, info


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1600,1000", f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.mark.timeout(240)
def test_model_page_shows_the_registered_student_and_its_champion_alias(registered, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, info = registered
    browser.get(f"{server.url}/#/models/{MODEL_NAME}")
    WebDriverWait(browser, 90, poll_frequency=0.5).until(
        lambda d: CHAMPION_ALIAS in d.find_element(By.TAG_NAME, "body").text
    )
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "mlflow_model_page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000

    body = browser.find_element(By.TAG_NAME, "body").text
    assert MODEL_NAME in body
    # The alias sits in the row of the version the tracker registered, not elsewhere on the page.
    link = browser.find_element(By.XPATH, f"//a[normalize-space()='Version {info.version}']")
    row = link.find_element(By.XPATH, f"./ancestor::*[contains(., '{CHAMPION_ALIAS}')][1]")
    assert CHAMPION_ALIAS in row.text and "Registered at" not in row.text
    assert "dataset" in row.text and "digits" in row.text


@pytest.mark.timeout(240)
def test_the_experiment_opens_on_its_training_runs_not_genai_traces(registered, browser):
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, info = registered
    client = MlflowClient(tracking_uri=server.url)
    experiment = client.get_experiment_by_name("ui")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    tracker = Tracker(server.url, experiment="ui")
    tracker.check_reachable()
    browser.get(tracker.ui_url(run=False))
    WebDriverWait(browser, 90, poll_frequency=0.5).until(
        lambda d: "Run Name" in d.find_element(By.TAG_NAME, "body").text
    )
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "mlflow_experiment_page.png"))
    body = browser.find_element(By.TAG_NAME, "body").text
    # The runs table with n2n's run and its registered student, not the traces dashboard.
    assert "n2n run" in body and f"{MODEL_NAME}\nv{info.version}" in body, body[:1500]
    assert "Token Usage" not in body and "Tool calls" not in body


README = Path(__file__).resolve().parents[1] / "README.md"
LOCAL_UI = "http://127.0.0.1:5000"


def readme_ui_address() -> str:
    """The address the README tells a user to open after ``mlflow ui``."""
    line = next(
        ln for ln in README.read_text().splitlines() if "mlflow ui --backend-store-uri" in ln
    )
    return next(word for word in line.split() if word.startswith(LOCAL_UI))


@pytest.mark.timeout(240)
def test_the_readme_address_opens_the_training_runs(registered, browser):
    """The README's ``mlflow ui`` line, followed as written (on this test's server), lands on
    the experiment's runs, not on MLflow 3's GenAI view."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, info = registered
    address = readme_ui_address()
    assert "workflowType=machine_learning" in address
    browser.get(address.replace(LOCAL_UI, server.url))
    WebDriverWait(browser, 90, poll_frequency=0.5).until(
        lambda d: "Run Name" in d.find_element(By.TAG_NAME, "body").text
    )
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "n2n run" in body and "Token Usage" not in body, body[:1500]


def test_a_sqlite_run_says_how_to_open_its_page(tmp_path):
    db = tmp_path / "mlflow.db"
    tracker = Tracker(f"sqlite:///{db}", experiment="n2n")
    tracker.check_reachable()
    tracker.start({"name": "x"}, {"arch": "small_cnn", "params": 1}, dataset="digits")
    tracker.close()
    where = tracker.where_to_look()
    assert where.startswith(f"mlflow ui --backend-store-uri sqlite:///{db}, then open {LOCAL_UI}/")
    assert f"#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}?" in where
    assert where.endswith("workflowType=machine_learning")
    # The README's address is this store's first experiment, as it is in a new store.
    assert (
        readme_ui_address()
        == f"{LOCAL_UI}/#/experiments/{tracker.experiment_id}?workflowType=machine_learning"
    )

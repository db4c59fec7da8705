"""`fedpneumo ui` beyond the shared runs: live updates, a database that is down."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from fedpneumo.flower import free_port
from persistence import repositories as repo
from persistence.db import get_engine, session_scope
from tests.conftest import run_cli
from tests.dashboard import dashboard, save_screenshot

pytestmark = pytest.mark.e2e

ROUND = {"loss": 0.5, "accuracy": 0.8, "auroc": 0.875, "threshold": 0.4}


def test_an_open_run_page_shows_a_round_that_lands_later(
    sqlite_url: str, browser: Any, tmp_path: Path
) -> None:
    with session_scope(get_engine(sqlite_url)) as s:
        experiment = repo.get_or_create_experiment(s, name="live")
        # In progress and owned by this (live) process: not stale.
        run = repo.create_run(
            s,
            experiment_id=experiment.id,
            training_mode="federated",
            num_rounds=3,
            strategy="fedavg",
        )
        run_id = run.id
        repo.add_server_evaluation(s, run_id=run_id, round_number=0, metrics=ROUND)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    with dashboard(sqlite_url) as (address, _):
        page.goto(f"{address}/runs/{run_id}")
        assert page.locator("#status").inner_text() == "in_progress"
        assert page.locator("#rounds tr[data-step='1']").count() == 0
        with session_scope(get_engine(sqlite_url)) as s:
            repo.add_server_evaluation(
                s, run_id=run_id, round_number=1, metrics={**ROUND, "auroc": 0.9375}
            )
            repo.update_run(s, run_id=run_id, rounds_completed=1)
        # No reload: the page follows the run by itself.
        page.locator("#rounds tr[data-step='1']").wait_for(timeout=15_000)
        assert page.locator("#best-auroc").inner_text() == "0.9375"
        assert page.locator("#progress").inner_text() == "1/3"
        save_screenshot(page, tmp_path / "dashboard-live.png")
    page.close()


def test_an_unreachable_database_is_one_sentence_and_no_password(
    browser: Any, tmp_path: Path
) -> None:
    password = "s3cret-pw"
    url = f"postgresql://fedpneumo:{password}@127.0.0.1:{free_port()}/tracking"
    page = browser.new_page()
    with dashboard(url) as (address, proc):
        response = page.goto(address + "/")
        assert response is not None and response.status == 503
        message = page.locator("#error").inner_text()
        html = page.content()
        save_screenshot(page, tmp_path / "dashboard-down.png")
    page.close()
    log = proc.stdout.read() if proc.stdout else ""
    masked = make_url(url).render_as_string(hide_password=True)
    assert message == f"database {masked}: server unreachable (connection refused)"
    assert password not in html and password not in log
    assert message in log and "Traceback" not in log


def test_another_host_is_warned_about_and_a_busy_port_is_one_line(
    sqlite_url: str,
) -> None:
    with dashboard(sqlite_url, "--host", "0.0.0.0") as (_, proc):
        pass
    output = proc.stdout.read() if proc.stdout else ""
    assert "the dashboard has no login" in output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("ui", "--db", sqlite_url, "--port", str(port), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use); pick "
        "another --port, or a --host address of this machine"
    ]
    assert os.environ.get("DATABASE_URL") is None


def test_the_live_data_is_strict_json_when_a_metric_is_nan(sqlite_url: str) -> None:
    import json
    import urllib.error
    import urllib.request

    with session_scope(get_engine(sqlite_url)) as s:
        experiment = repo.get_or_create_experiment(s, name="nan")
        run = repo.create_run(s, experiment_id=experiment.id, training_mode="federated")
        run_id = run.id
        repo.add_server_evaluation(s, run_id=run_id, round_number=0, metrics=ROUND)
        repo.add_metrics(
            s,
            run_id=run_id,
            client_id=None,
            points=[repo.MetricPoint("train_loss", float("nan"), 0, "train", 0)],
        )
    with dashboard(sqlite_url) as (address, _):
        body = urllib.request.urlopen(f"{address}/api/runs/{run_id}").read()
        # An id past 64 bits is an unknown run, not a server error.
        huge = "99999999999999999999"
        for path in (f"/runs/{huge}", f"/compare?run={huge}"):
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(address + path)
            assert missing.value.code == 404, path
            assert f"run {huge} does not exist" in missing.value.read().decode()
    data = json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["curve"][0]["train_loss"] is None

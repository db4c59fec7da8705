"""`fedpneumo ui`: a read-only web dashboard over the tracking database.

A small FastAPI app rendering Jinja2 pages; charts are drawn in the browser by
plotly.js, served from the installed ``plotly`` package (nothing is fetched
from the internet). Every request opens a read-only session
(``persistence.readonly``), so the dashboard can never change a run. Pages:
the runs list (filters, sorting), one run (config, curves, hospitals x rounds
heatmap, clients, privacy, failures, test score; it refreshes itself while
the run is in progress) and a comparison of runs.
"""

from __future__ import annotations

import json
import logging
import math
import socket
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates

from fedpneumo.reports import (
    MISSING,
    RunReport,
    config_differences,
    hospital_spread,
    load_clients,
    load_failures,
    load_runs,
)
from fedpneumo.runs_cli import check_run_ids
from fedpneumo.tables import test_line
from persistence.db import mask_url
from persistence.errors import DatabaseError, InputError, RunNotFoundError
from persistence.readonly import read_session

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
# The runs list's columns: (query value, header, sort key of a RunReport).
COLUMNS: tuple[tuple[str, str, Callable[[RunReport], Any]], ...] = (
    ("id", "id", lambda r: r.id),
    ("experiment", "experiment", lambda r: r.experiment),
    ("mode", "mode", lambda r: r.mode),
    ("strategy", "strategy", lambda r: r.strategy or ""),
    ("partition", "partition", lambda r: r.partition or ""),
    ("privacy", "privacy", lambda r: r.privacy or ""),
    ("status", "status", lambda r: r.status),
    ("rounds", "rounds / epochs", lambda r: r.rounds_done),
    ("best_auroc", "best val AUROC", lambda r: _num(r.best and r.best.auroc)),
    ("worst_hospital", "worst hospital AUROC", lambda r: _num(worst_hospital(r))),
    ("epsilon", "final epsilon", lambda r: _num(r.final_epsilon)),
    ("duration", "duration", lambda r: r.duration_s or 0.0),
)
STATUSES = ("in_progress", "completed", "failed", "stale")
RUNS_NONE: list[int] = []  # the compare page without runs picked
MODES = ("federated", "centralized")


def _num(value: float | None) -> float:
    """Sort key of an optional number: missing values sort first."""
    return -math.inf if value is None or math.isnan(value) else value


def worst_hospital(report: RunReport) -> float | None:
    """The lowest hospital AUROC at the run's best round (None without one)."""
    return report.lowest_hospital(report.best, "auroc")


def fmt(value: Any, digits: int = 4) -> str:
    """Format a number for a page cell ('-' when missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def plain(value: Any) -> Any:
    """Return value with NaN and infinities as None: strict JSON for the page."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def script_json(value: Any) -> str:
    """JSON for a <script> element: no text in it can close the element."""
    return json.dumps(value).replace("<", "\\u003c")


def run_payload(report: RunReport, clients: list[Any]) -> dict[str, Any]:
    """Everything the run page draws, as plain JSON (also its live updates)."""
    rounds = sorted(report.hospitals)
    hospitals = sorted(
        {h.identifier for scores in report.hospitals.values() for h in scores},
        key=lambda name: (len(name), name),
    )
    heat = [
        [
            next(
                (h.auroc for h in report.hospitals[rnd] if h.identifier == name),
                None,
            )
            for rnd in rounds
        ]
        for name in hospitals
    ]
    best = report.best
    return plain(
        {
            "id": report.id,
            "status": report.status,
            "mode": report.mode,
            "rounds_done": report.rounds_done,
            "rounds_planned": report.rounds_planned,
            "best": None if best is None else {"step": best.step, "auroc": best.auroc},
            "curve": [
                {
                    "step": p.step,
                    "auroc": p.auroc,
                    "accuracy": p.accuracy,
                    "loss": p.loss,
                    "train_loss": p.train_loss,
                    "epsilon": report.epsilons.get(p.step),
                }
                for p in report.curve
            ],
            "heatmap": {"rounds": rounds, "hospitals": hospitals, "auroc": heat},
            "clients": [
                {"name": c.identifier, "train_loss": c.train_losses} for c in clients
            ],
            "epsilons": report.epsilons,
        }
    )


def create_app(url: str) -> FastAPI:
    """Build the dashboard for one tracking database (opened read-only)."""
    app = FastAPI(title="fedpneumo", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(fmt=fmt, database=mask_url(url))
    plotly_js = (
        resources.files("plotly") / "package_data" / "plotly.min.js"
    ).read_bytes()

    def page(
        request: Request, name: str, status: int = 200, **context: Any
    ) -> Response:
        return templates.TemplateResponse(
            request, name, {"request": request, **context}, status_code=status
        )

    @app.exception_handler(DatabaseError)
    async def database_down(request: Request, exc: DatabaseError) -> Response:
        # One sentence, password masked (describe_error), on the page and in the log.
        log.error("%s", exc)
        return page(
            request, "error.html", 503, title="Database unavailable", message=str(exc)
        )

    @app.exception_handler(RunNotFoundError)
    async def no_such_run(request: Request, exc: RunNotFoundError) -> Response:
        return page(
            request,
            "error.html",
            404,
            title="Run not found",
            message=f"run {exc.run_id} does not exist in {mask_url(url)}",
        )

    @app.get("/static/plotly.min.js")
    def plotly() -> Response:
        return Response(plotly_js, media_type="application/javascript")

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        files = {"dashboard.js": "application/javascript", "dashboard.css": "text/css"}
        if name not in files:
            return Response(status_code=404)
        return Response((HERE / "static" / name).read_bytes(), media_type=files[name])

    @app.get("/", response_class=HTMLResponse)
    def runs_page(
        request: Request,
        experiment: str = "",
        status: str = "",
        mode: str = "",
        sort: str = "id",
        desc: bool = True,
    ) -> Response:
        with read_session(url) as session:
            reports = load_runs(session)
        experiments = sorted({r.experiment for r in reports})
        shown = [
            r
            for r in reports
            if (not experiment or r.experiment == experiment)
            and (not status or r.status == status)
            and (not mode or r.mode == mode)
        ]
        keys = {name: key for name, _, key in COLUMNS}
        shown.sort(key=keys.get(sort, keys["id"]), reverse=desc)
        return page(
            request,
            "runs.html",
            runs=shown,
            columns=COLUMNS,
            worst_hospital=worst_hospital,
            filters={"experiment": experiment, "status": status, "mode": mode},
            experiments=experiments,
            statuses=STATUSES,
            modes=MODES,
            sort=sort,
            desc=desc,
        )

    def one_run(run_id: int) -> tuple[RunReport, list[Any], list[dict[str, Any]]]:
        check_run_ids(run_id)  # no database can hold an id past 64 bits
        with read_session(url) as session:
            (report,) = load_runs(session, [run_id])
            clients = load_clients(session, [run_id])[run_id]
            failures = load_failures(session, run_id)
        return report, clients, failures

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: int) -> Response:
        report, clients, failures = one_run(run_id)
        best = report.best
        spreads = [
            (what, hospital_spread(point.step, report.hospitals[point.step]))
            for what, point in (("best", best), ("last", report.final))
            if point is not None and report.hospitals.get(point.step)
        ]
        return page(
            request,
            "run.html",
            run=report,
            payload=script_json(run_payload(report, clients)),
            config=json.dumps(report.config, indent=2, sort_keys=True),
            failures=failures,
            spreads=spreads,
            no_test=test_line(report).removeprefix("test: "),
        )

    @app.get("/api/runs/{run_id}")
    def run_data(run_id: int) -> Response:
        report, clients, _ = one_run(run_id)
        return JSONResponse(run_payload(report, clients))

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(
        request: Request, run: Annotated[list[int], Query()] = RUNS_NONE
    ) -> Response:
        ids = check_run_ids(list(dict.fromkeys(run)))
        with read_session(url) as session:
            reports = load_runs(session, ids) if ids else []
        diffs = config_differences([r.config for r in reports]) if reports else {}
        rows = compare_rows(reports)
        differing = [
            (key, ["(absent)" if v is MISSING else json.dumps(v) for v in values])
            for key, values in diffs.items()
        ]
        curves = [
            {
                "label": r.label,
                "steps": [p.step for p in r.curve],
                "auroc": [p.auroc for p in r.curve],
                "epsilon": [r.epsilons.get(p.step) for p in r.curve],
            }
            for r in reports
        ]
        return page(
            request,
            "compare.html",
            runs=reports,
            rows=rows,
            differing=differing,
            curves=script_json(curves),
        )

    return app


def compare_rows(reports: Sequence[RunReport]) -> list[tuple[str, list[str]]]:
    """The comparison table: best, final, worst hospital and epsilon per run."""
    return [
        ("mode", [r.mode for r in reports]),
        ("status", [r.status for r in reports]),
        ("privacy", [r.privacy or "none" for r in reports]),
        ("best val AUROC", [fmt(r.best and r.best.auroc) for r in reports]),
        ("best round / epoch", [fmt(r.best and r.best.step) for r in reports]),
        ("final val AUROC", [fmt(r.final and r.final.auroc) for r in reports]),
        (
            "worst hospital AUROC (best round)",
            [fmt(worst_hospital(r)) for r in reports],
        ),
        (
            "final epsilon",
            [fmt(r.final_epsilon, 3) if r.final_epsilon else "-" for r in reports],
        ),
        ("test AUROC", [fmt(r.test.auroc if r.test else None) for r in reports]),
    ]


def check_address(host: str, port: int) -> None:
    """Fail in one line, before serving, when the address cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InputError(
            f"cannot listen on {host}:{port} ({reason}); pick another --port, or a "
            "--host address of this machine"
        ) from None


def serve(url: str, host: str, port: int) -> None:
    """Serve the dashboard until interrupted."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "serving on %s: the dashboard has no login; anyone who can reach this "
            "address can read every run",
            host,
        )
    log.info("dashboard of %s on http://%s:%d/", mask_url(url), host, port)
    uvicorn.run(create_app(url), host=host, port=port, log_level="warning")

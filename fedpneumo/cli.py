"""The ``fedpneumo`` command line."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedpneumo.flower import APP_DIR
from fedpneumo.runs_cli import DbOption, check_run_ids, runs_app
from persistence.errors import FedPneumoError

app = typer.Typer(
    help="Federated pneumonia detection with Flower, tracked in SQL.",
    # Plain click messages: a usage error is one "Error: ..." line, no box.
    rich_markup_mode=None,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
db_app = typer.Typer(
    help="Manage the tracking database schema.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
deploy_app = typer.Typer(
    help="Secure Flower deployment: key material, admitting SuperNodes, running "
    "them, submitting sessions.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(db_app, name="db")
app.add_typer(runs_app, name="runs")
app.add_typer(deploy_app, name="deploy")

console = Console()
log = logging.getLogger("fedpneumo")


def setup_logging(verbose: bool = False) -> None:
    """Send log records to stderr, one line each."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "matplotlib", "PIL", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logs.")
    ] = False,
) -> None:
    setup_logging(verbose)


@db_app.command("upgrade")
def db_upgrade(db: DbOption = None) -> None:
    """Create or migrate the tracking schema to the newest version."""
    from persistence.db import default_database_url, mask_url, upgrade_database

    url = db or default_database_url()
    before, after = upgrade_database(url)
    if before == after:
        console.print(f"{mask_url(url)}: schema already at {after}, nothing to do")
    else:
        console.print(
            f"{mask_url(url)}: schema upgraded {before or 'empty'} -> {after}"
        )


AppOption = Annotated[
    Path | None,
    typer.Option(
        "--app",
        help="Flower app folder to run (default: this project's, which a "
        "wrapper app may extend, e.g. with Flower mods).",
        show_default=False,
    ),
]
OVERRIDES_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Hydra overrides, e.g. train.epochs=5 model=resnet18"),
]


@app.command(context_settings=OVERRIDES_CONTEXT)
def train(overrides: Overrides = None) -> None:
    """Train a centralized baseline; select on val; record one centralized run."""
    from server_app.compose import load_config, resolve_paths
    from server_app.resources import check_compute, check_outputs

    cfg = resolve_paths(load_config(overrides or []))
    check_compute(cfg)
    check_outputs(cfg)
    # The data and the database are checked before torch and scikit-learn load
    # (3 s): a bad file or an unreachable server fails in about a second.
    from server_app.factories import centralized_input

    data, url = centralized_input(cfg)
    from fedpneumo.centralized import run_centralized
    from fedpneumo.summary import print_centralized_summary

    try:
        result = run_centralized(cfg, data, url)
    except KeyboardInterrupt:
        sys.stderr.write(
            "interrupted: training stopped and its tracked run is marked failed; "
            "run the same command to start again\n"
        )
        raise
    print_centralized_summary(console, result, url)


@app.command(context_settings=OVERRIDES_CONTEXT)
def run(
    overrides: Overrides = None,
    multirun: Annotated[
        bool, typer.Option("--multirun", "-m", help="Sweep: one run per combination.")
    ] = False,
    flower_logs: Annotated[
        bool, typer.Option("--flower-logs", help="Echo Flower's own log lines.")
    ] = False,
    app_dir: AppOption = None,
) -> None:
    """Run a federated simulation (one Run per session) and print its summary."""
    from fedpneumo.launcher import LocalSuperLink, launch_env

    # Started before anything heavy loads: the SuperLink's two seconds of
    # start-up overlap the imports, the config and the data checks.
    with LocalSuperLink(launch_env(), Path.cwd(), app_dir or APP_DIR) as superlink:
        from fedpneumo.federated import run_sessions

        outcomes = run_sessions(
            overrides or [], multirun=multirun, echo=flower_logs, superlink=superlink
        )
    from fedpneumo.summary import print_federated_summary

    for outcome in outcomes:
        print_federated_summary(console, outcome)
    _exit_on_failures(outcomes)


@app.command()
def resume(
    run_id: Annotated[
        int,
        typer.Argument(help="The tracking database's run id.", callback=check_run_ids),
    ],
    db: DbOption = None,
    outputs: Annotated[
        Path, typer.Option(help="Outputs folder holding the default SQLite file.")
    ] = Path("outputs"),
    force: Annotated[
        bool, typer.Option(help="Resume even if the run looks alive.")
    ] = False,
    app_dir: AppOption = None,
) -> None:
    """Continue a federated run from its last completed round."""
    from fedpneumo.federated import finish_if_done, resume_session
    from fedpneumo.summary import print_federated_summary
    from persistence.db import default_database_url

    url = db or default_database_url(outputs)
    done = finish_if_done(run_id, url, force=force)
    if done is not None:
        console.print(
            f"run {run_id} is completed ({done.rounds_completed}/{done.num_rounds} "
            "rounds): nothing left to resume"
        )
        return
    outcome = resume_session(
        run_id, url, echo=False, force=force, app_dir=app_dir or APP_DIR
    )
    print_federated_summary(console, outcome)
    _exit_on_failures([outcome])


def _exit_on_failures(outcomes: list) -> None:
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        sys.stderr.write(f"error: {o.problem()}\n")
    if failed:
        raise typer.Exit(1)


@app.command()
def sync(
    outputs: Annotated[
        Path, typer.Option(help="Outputs folder whose spools to replay.")
    ] = Path("outputs"),
    db: DbOption = None,
) -> None:
    """Write metric batches spooled while the database was unreachable.

    A file that can never be written (malformed, or its run is gone) is moved
    to rejected/ beside its spool and the others go on (exit 1). A database
    that cannot take them (down, missing, not a tracking database) stops the
    replay and leaves every file in place; no database is created.
    """
    from persistence.db import default_database_url
    from persistence.errors import FailedRunError
    from persistence.spool import sync as replay_spools

    if not outputs.is_dir():
        raise typer.BadParameter(f"{outputs} is not a folder", param_hint="--outputs")
    url = db or default_database_url(outputs)
    # Database failures come back as one DatabaseError line, files left in place.
    files, stored, rejected = replay_spools(url, outputs)
    console.print(
        f"replayed {files} spooled batches: {stored} new rows, {rejected} rejected"
    )
    if rejected:
        raise FailedRunError(
            f"{rejected} of {files} spooled batches were rejected; each is named in "
            "a line above, with the reason and where the file is now"
        )


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Option(help="A saved model (best_model.pt).")],
    data: Annotated[str, typer.Option(help="A .npz file or Kermany image folder.")],
    split: Annotated[str, typer.Option(help="train, val or test.")] = "val",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Evaluate a saved model on any supported data file or folder."""
    from fedpneumo.centralized import evaluate_checkpoint
    from fedpneumo.summary import print_metrics

    metrics = evaluate_checkpoint(checkpoint, data, split)
    if as_json:
        # Strict JSON: an undefined metric (AUROC on one class) is null, not NaN.
        finite = {
            k: (v if not isinstance(v, float) or math.isfinite(v) else None)
            for k, v in metrics.items()
        }
        sys.stdout.write(json.dumps(finite, allow_nan=False) + "\n")
    else:
        print_metrics(console, metrics, title=f"{checkpoint} on {split}")


@app.command("ui")
def ui_cmd(
    db: DbOption = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; only this machine by default.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port to listen on.", min=1, max=65535)
    ] = 8050,
) -> None:
    """Serve a read-only dashboard of the tracking database (Ctrl-C stops it)."""
    from fedpneumo.runs_cli import _url
    from fedpneumo.ui import check_address, serve

    check_address(host, port)
    serve(_url(db), host, port)


KeysOption = Annotated[
    Path | None,
    typer.Option(
        "--keys",
        help="Folder made by `fedpneumo deploy keys` (ca.crt, supernode-N keys).",
    ),
]
InsecureOption = Annotated[
    bool,
    typer.Option(
        "--insecure-local-only",
        help="Plain text and no SuperNode keys: for a throwaway local test only.",
    ),
]


def _security(keys: Path | None, insecure: bool) -> Path | None:
    """Return the keys folder; plain text only when asked for by name."""
    from persistence.errors import InputError

    if (keys is None) == (not insecure):
        raise InputError(
            "give --keys DIR (TLS and SuperNode authentication) or, for a local "
            "experiment only, --insecure-local-only"
        )
    if insecure:
        log.warning(
            "INSECURE: plain text, and any SuperNode that reaches the SuperLink "
            "can join and receive the model (--insecure-local-only)"
        )
    return keys


@deploy_app.command("keys")
def deploy_keys(
    out: Annotated[Path, typer.Option(help="Empty folder for the key material.")],
    nodes: Annotated[
        int, typer.Option(help="SuperNodes (hospitals) to make keys for.")
    ],
    name: Annotated[
        list[str] | None,
        typer.Option(
            help="Another host name or IP the SuperLink is reached by (repeatable)."
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Days the certificates are valid.")] = 365,
) -> None:
    """Make a CA, the SuperLink's TLS certificate and one key pair per SuperNode.

    The certificate names superlink, localhost and 127.0.0.1 (what the
    compose stack and the SuperLink itself dial), plus every --name.
    """
    from fedpneumo.credentials import DEFAULT_NAMES, make_keys

    names = [*DEFAULT_NAMES, *(name or [])]
    written = make_keys(out, nodes, names=names, days=days)
    for path in written:
        console.print(f"wrote {path}", markup=False)
    console.print(
        f"next: start the SuperLink with these files, then `fedpneumo deploy "
        f"register --keys {out} --superlink HOST:PORT --nodes {nodes}`; give "
        "hospital N only ca.crt and its supernode-N key pair; keep ca.key offline",
        markup=False,
    )


@deploy_app.command("add-node")
def deploy_add_node(
    keys: Annotated[Path, typer.Option(help="The deployment's key folder.")],
    index: Annotated[int, typer.Option(help="The new SuperNode's number.", min=0)],
) -> None:
    """Make the key pair of a hospital joining later (then `register` it)."""
    from fedpneumo.credentials import add_node_key

    for path in add_node_key(keys, index):
        console.print(f"wrote {path}", markup=False)


@deploy_app.command("check")
def deploy_check(
    keys: Annotated[Path, typer.Option(help="The deployment's key folder.")],
    node: Annotated[
        list[int] | None, typer.Option(help="Also check this SuperNode's key.")
    ] = None,
) -> None:
    """Check certificates (current, issued by the CA) and keys; name a bad file."""
    from fedpneumo.deploy import check_keys

    check_keys(keys, nodes=node or [])
    console.print(f"{keys}: certificates current and issued by its CA", markup=False)


@deploy_app.command("register")
def deploy_register(
    keys: Annotated[Path, typer.Option(help="The deployment's key folder.")],
    superlink: Annotated[str, typer.Option(help="The SuperLink's host:port.")],
    nodes: Annotated[
        int | None, typer.Option(help="Register SuperNodes 0..N-1.", min=1)
    ] = None,
    node: Annotated[
        list[int] | None, typer.Option(help="Register this SuperNode (repeatable).")
    ] = None,
    wait_s: Annotated[float, typer.Option(help="Wait for the SuperLink.")] = 120.0,
) -> None:
    """Admit SuperNodes: register their public keys with the SuperLink."""
    from fedpneumo.credentials import CA_CERT
    from fedpneumo.deploy import check_keys, register
    from fedpneumo.flower import wait_healthy

    indices = sorted({*(node or []), *range(nodes or 0)})
    if not indices:
        raise typer.BadParameter("give --nodes N or --node I", param_hint="--nodes")
    check_keys(keys, server=False)  # before dialling with it
    wait_healthy(superlink, timeout_s=wait_s, ca_cert=keys / CA_CERT)
    for index, node_id in register(keys, superlink, indices).items():
        state = "registered before" if node_id is None else f"node id {node_id}"
        console.print(f"supernode-{index}: {state}", markup=False)


@deploy_app.command(
    "supernode",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def deploy_supernode(
    ctx: typer.Context,
    index: Annotated[int, typer.Option(help="This SuperNode's number.", min=0)],
    superlink: Annotated[str, typer.Option(help="The SuperLink's host:port.")],
    node_config: Annotated[str, typer.Option(help="flower-supernode --node-config.")],
    keys: KeysOption = None,
    insecure: InsecureOption = False,
) -> None:
    """Run one SuperNode; say in one line why the SuperLink refused it.

    Arguments after the options go to flower-supernode (e.g. --port 9094).
    """
    from fedpneumo.deploy import run_supernode

    run_supernode(_security(keys, insecure), index, superlink, node_config, ctx.args)


@deploy_app.command("submit", context_settings=OVERRIDES_CONTEXT)
def deploy_submit(
    superlink: Annotated[str, typer.Option(help="The SuperLink's host:port.")],
    overrides: Overrides = None,
    app_dir: Annotated[
        Path, typer.Option("--app", help="The Flower app folder.")
    ] = APP_DIR,
    keys: KeysOption = None,
    insecure: InsecureOption = False,
    wait_s: Annotated[float, typer.Option(help="Wait for the SuperLink.")] = 120.0,
) -> None:
    """Run one federated session on a deployed SuperLink; exit 0 iff it completed."""
    from fedpneumo.credentials import CA_CERT
    from fedpneumo.deploy import check_keys, submit
    from fedpneumo.flower import wait_healthy
    from persistence.errors import FailedRunError

    folder = _security(keys, insecure)
    if folder is not None:
        check_keys(folder, server=False)  # before dialling with it
    ca_cert = None if folder is None else folder / CA_CERT
    wait_healthy(superlink, timeout_s=wait_s, ca_cert=ca_cert)
    outcome = submit(superlink, overrides or [], app_dir=app_dir, ca_cert=ca_cert)
    if not outcome.completed:
        raise FailedRunError(
            f"Flower run {outcome.flwr_run_id} ended {outcome.status}: "
            f"{outcome.details}"
        )
    log.info("Flower run %s completed", outcome.flwr_run_id)


def main() -> None:
    """Run the CLI; our errors exit with their code and a one-line message.

    Output that cannot be written ends the same way: a reader that went away
    (``| head -1``) exits quietly with 141 (128 + SIGPIPE), as Unix tools
    killed by SIGPIPE do; a full disk or another write error is one line.
    """
    stdout = _WatchedOutput(sys.stdout) if sys.stdout is not None else None
    if stdout is not None:
        sys.stdout = stdout  # type: ignore[assignment]
    code: int | str | None = 0
    try:
        code = _run_app()
        if stdout is not None:
            stdout.flush()  # now, not at interpreter exit, where it cannot be handled
    except OSError:
        if stdout is None or stdout.failed is None:
            raise
    finally:
        if stdout is not None and sys.stdout is not stdout.stream:
            sys.stdout = stdout.stream
    if stdout is not None and stdout.failed is not None:
        code = _output_failed(stdout.stream, stdout.failed)
    _close_databases()
    # Skip the collector's final pass over everything the command imported
    # (pandas and pyarrow come with the partition check): 0.4 s at exit.
    # Module teardown and atexit handlers still run.
    gc.freeze()
    sys.exit(code)


def _close_databases() -> None:
    """Close pooled connections now (SQLite folds its WAL into the file)."""
    db = sys.modules.get("persistence.db")
    if db is not None:
        db.dispose_engines()


def _run_app() -> int | str | None:
    try:
        app()
    except SystemExit as done:
        return done.code
    except FedPneumoError as exc:
        # One plain line, never wrapped: scripts and users grep for it.
        _stderr_line(f"error: {exc}")
        return exc.exit_code
    return 0


class _WatchedOutput:
    """Stdout that remembers its first failed write.

    main() then knows that an OSError (or the quiet exit rich and click make
    on a broken pipe) came from writing the output, not from anything else.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.failed: OSError | None = None

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as exc:
            self.failed = self.failed or exc
            raise

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            self.failed = self.failed or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _output_failed(stream: Any, exc: OSError) -> int:
    # Point the descriptor at /dev/null: what is still buffered is then
    # discarded at exit instead of failing again with "Exception ignored".
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    if exc.errno == errno.EPIPE:
        return 128 + signal.SIGPIPE
    reason = exc.strerror or str(exc)
    _stderr_line(f"error: cannot write the output ({reason})")
    return 1


def _stderr_line(line: str) -> None:
    # stderr may be broken too (2>&1 into the same full disk): then say nothing.
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

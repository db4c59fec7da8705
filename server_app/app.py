"""The Flower ServerApp: one Run per federated session."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server_app.federation import run_session

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Open the Run, train for the configured rounds, close the Run."""
    run_session(grid, context)

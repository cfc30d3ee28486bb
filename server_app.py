"""Flower ServerApp: reads the run config, runs the chosen method (fedhpro_flwr.app.server)."""

from logging import ERROR
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedhpro_flwr.app.server import RUN_STOPPERS, RunStopped, run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_server(grid, context.run_config, app_dir=Path(__file__).resolve().parent)
    except RUN_STOPPERS as exc:  # the message says it all
        log(ERROR, "fedhpro-flwr: %s", exc)
        raise RunStopped(str(exc)) from None

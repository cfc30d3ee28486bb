"""Flower ServerApp: reads the run config and runs the chosen method (see fedhpro_flwr.server)."""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhpro_flwr.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config, app_dir=Path(__file__).resolve().parent)

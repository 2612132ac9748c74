"""Run one federation on Flower's simulation runtime with the Ray backend."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from server.settings import RunSettings

FLOWER_OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Otherwise Flower's runtime tries to reinstall every dependency for each run.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def prepare_environment(out_dir: str | Path) -> None:
    """Flower reads these when it starts: set them before the first simulation."""
    for key, value in FLOWER_OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("FLWR_HOME", str(Path(out_dir).resolve() / ".flwr"))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def backend_config(settings: RunSettings, verbose: bool = False) -> dict:
    init_args: dict = {"include_dashboard": False, "log_to_driver": verbose,
                       "logging_level": logging.INFO if verbose else logging.ERROR}
    if settings.ray_address:
        init_args["address"] = settings.ray_address
    else:
        if settings.ray_num_cpus > 0:
            init_args["num_cpus"] = settings.ray_num_cpus
        if settings.ray_num_gpus >= 0:
            init_args["num_gpus"] = settings.ray_num_gpus
    return {
        "client_resources": {"num_cpus": settings.task.client_cpus, "num_gpus": settings.client_gpus},
        "init_args": init_args,
    }


def simulate(settings: RunSettings, show_progress: bool = True, verbose: bool = False) -> dict:
    """Run the federation described by `settings` (already validated) and return its
    summary; the run directory is written as rounds complete."""
    prepare_environment(settings.out)
    import ray
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from server.progress import RunProgress
    from server.server_app import run_federation

    if not verbose:  # keep the live display readable; --verbose restores Flower's log
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")
    summaries: list[dict] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):
        with RunProgress(settings.total_rounds, enabled=show_progress) as progress:
            summaries.append(run_federation(grid, settings, progress))

    try:
        run_simulation(
            server_app=server_app, client_app=client_app,
            num_supernodes=settings.federation.clients, backend_name="ray",
            backend_config=backend_config(settings, verbose), verbose_logging=verbose,
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if not summaries:
        raise RuntimeError("the simulation ended without a result; rerun with --verbose for Flower's log")
    return summaries[0]


def run_unless_finished(runs: dict, force: bool, console, describe=None) -> None:
    """Run each named, validated RunSettings whose run directory has no summary.json yet
    (all of them with `force`): benchmarks continue where an earlier call stopped."""
    for name, settings in runs.items():
        if (Path(settings.out) / "summary.json").exists() and not force:
            console.print(f"{name}: finished earlier in {settings.out}, kept (--force reruns)")
            continue
        console.print(describe(name, settings) if describe else f"{name}: {settings.rounds} rounds -> {settings.out}")
        simulate(settings, show_progress=False)

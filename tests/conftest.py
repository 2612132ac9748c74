import os

# Flower offline, as the Makefile sets it; here too so plain `pytest` works.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import pytest  # noqa: E402


@pytest.fixture
def flower_run_identity():
    """Messages built outside a running ServerApp need a run id, as inside one."""
    from flwr.supercore.task_identity import TaskIdentity

    previous = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous

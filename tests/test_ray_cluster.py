"""A federated simulation attached to a running Ray cluster (simulation.ray_address)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from persistence.db import dispose_engines, get_engine, session_scope
from persistence.models import ClientEvaluation, Run
from tests.conftest import run_cli
from tests.ray_cluster import ThrowawayRay

# What the cluster itself recorded: its jobs, and each actor's class and job.
CLUSTER_STATE = """
import json, ray
from ray._private import state
ray.init()
jobs = [
    {"job": j["JobID"], "entrypoint": j.get("Entrypoint", "")} for j in state.jobs()
]
actors = [
    {"class": a["ActorClassName"], "job": a["JobID"]} for a in state.actors().values()
]
print(json.dumps({"jobs": jobs, "actors": actors}))
"""


@pytest.mark.e2e
def test_a_simulation_runs_on_an_existing_ray_cluster(
    tmp_path: Path, data_file: Path
) -> None:
    out = tmp_path / "out"
    with ThrowawayRay(num_cpus=2) as cluster:
        result = run_cli(
            "run",
            f"data.path={data_file}",
            "data.limit=200",
            "model.width=8",
            "simulation.num_supernodes=3",
            "num_rounds=1",
            f"simulation.ray_address={cluster.address}",
            f"outputs_dir={out}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        seen = json.loads(cluster.driver_query(CLUSTER_STATE).splitlines()[-1])
        processes = cluster.processes()
        assert processes, "the cluster stopped with the run"
    assert cluster.processes() == []  # stopped, with every worker

    # Flower's simulation was a job of this cluster, and its ClientApp
    # actors ran there (the cluster's own records, not our logs).
    (simulation,) = [j for j in seen["jobs"] if "flwr-simulation" in j["entrypoint"]]
    client_actors = [
        a
        for a in seen["actors"]
        if a["class"] == "ClientAppActor" and a["job"] == simulation["job"]
    ]
    assert client_actors, seen
    with session_scope(get_engine(f"sqlite:///{out / 'fedpneumo.db'}")) as s:
        run = s.scalars(select(Run)).one()
        assert (run.status, run.rounds_completed) == ("completed", 1)
        assert len(s.scalars(select(ClientEvaluation)).all()) == 3
    dispose_engines()

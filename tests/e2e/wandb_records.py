"""Read an offline W&B run's ``run-<id>.wandb`` file (a LevelDB-style log of protobuf records), to check
what a run told W&B without a server."""

from __future__ import annotations

from pathlib import Path

from doppel.run_logs import wandb_records


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    parsed = []
    for raw in wandb_records(Path(path)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def run_settings(run_dir: Path) -> dict[str, str]:
    """The run's group, job type and name as sent at its start."""
    path = next(Path(run_dir).glob("run-*.wandb"))
    run = next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")
    return {"group": run.run_group, "job_type": run.job_type, "name": run.display_name}


def history(run_dir: Path) -> list[dict[str, object]]:
    """Every ``log`` call of the run as {key: value}; nested keys are joined with "/" (a histogram's
    ``<key>/values`` and ``<key>/bins``)."""
    import json

    path = next(Path(run_dir).glob("run-*.wandb"))
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records(path) if r.WhichOneof("record_type") == "history"]

"""Read an offline W&B run's ``run-<id>.wandb`` file (a LevelDB-style log of protobuf records), to check
what a run told W&B without a server."""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768  # the log's block size; a chunk header never straddles a block
HEADER = 7  # ":W&B" + magic (2 bytes) + version, and each chunk's crc (4) + length (2) + type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending, out = HEADER, b"", []
    while position + HEADER <= len(data):
        block_end = position + BLOCK - position % BLOCK
        if block_end - position < HEADER:  # the block's tail is padding
            position = block_end
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        chunk = data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
        else:  # zeros: the rest of the block is empty
            position = block_end
    parsed = []
    for raw in out:
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

"""A run's logged scalars, read back from whichever logger wrote them: Lightning's CSV (``csv/metrics.csv``),
W&B's own record file (``wandb/*run-*/run-<id>.wandb``, online or offline) or TensorBoard's event files
(``tensorboard/**/events.out.tfevents.*``). Each comes back as rows ``{"step": s, "epoch": e, key: value}``.
"""

from __future__ import annotations

import csv
import json
import math
import struct
import zlib
from pathlib import Path

Rows = list[dict[str, float]]

# W&B's .wandb file: LevelDB's log format (32 KiB blocks of records, each
# crc32(type + data) | length | type | data, little-endian) after a 7-byte header of its own.
WANDB_HEADER = struct.Struct("<4sHB")
WANDB_IDENT, WANDB_MAGIC = b":W&B", 0xBEE1
RECORD_HEADER = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_log(run: Path) -> Rows:
    """The run's scalars from its CSV log, else its W&B records, else its TensorBoard events; [] if none."""
    for read in (read_csv_log, read_wandb_log, read_tensorboard_log):
        rows = read(run)
        if rows:
            return rows
    return []


def read_csv_log(run: Path) -> Rows:
    """``csv/metrics.csv`` as rows of the values each holds (empty cells dropped)."""
    path = run / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file, each a serialised ``wandb_internal_pb2.Record``; a torn last record
    (a run still writing, or killed) ends the list."""
    data = path.read_bytes()
    if len(data) < WANDB_HEADER.size:
        return []
    ident, magic, _version = WANDB_HEADER.unpack_from(data)
    if ident != WANDB_IDENT or magic != WANDB_MAGIC:
        raise ValueError(f"{path} is not a W&B record file (it starts {data[:7]!r}, not {WANDB_IDENT!r} and "
                         f"magic {WANDB_MAGIC:#x}).")
    records, pending, offset = [], b"", WANDB_HEADER.size
    while offset + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < RECORD_HEADER.size:  # the block's zero trailer
            offset += left_in_block
            continue
        checksum, length, kind = RECORD_HEADER.unpack_from(data, offset)
        start = offset + RECORD_HEADER.size
        chunk = data[start:start + length]
        if kind == 0 and length == 0:  # zero padding
            offset += left_in_block
            continue
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            break
        offset = start + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
            pending = b""
    return records


def read_wandb_log(run: Path) -> Rows:
    """The history rows of every W&B run file under ``<run>/wandb`` (several after resumes, in time order; a
    later file's steps replace the earlier's from its first step on). Needs only the wandb package."""
    files = sorted((run / "wandb").glob("*run-*/run-*.wandb"), key=lambda p: p.parent.name.split("run-", 1)[1])
    if not files:
        return []
    from wandb.proto import wandb_internal_pb2

    rows: Rows = []
    for path in files:
        fresh: Rows = []
        for raw in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") != "history":
                continue
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                value = json.loads(item.value_json) if item.value_json else None
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[key] = float(value)
            if "trainer/global_step" in row:  # Lightning's step, as the CSV's "step" column
                row["step"] = row.pop("trainer/global_step")
            for own in ("_step", "_runtime", "_timestamp"):  # W&B's bookkeeping, not the run's
                row.pop(own, None)
            if row:
                fresh.append(row)
        first = next((r["step"] for r in fresh if "step" in r), None)
        if first is not None:
            rows = [r for r in rows if r.get("step", -math.inf) < first]
        rows += fresh
    return rows


def read_tensorboard_log(run: Path) -> Rows:
    """Every scalar of the event files under ``<run>/tensorboard``, a row per step (files in name order: a
    resumed run's later values replace the earlier); needs the tensorboard package (the ``tensorboard``
    extra), as the logger does."""
    files = sorted((run / "tensorboard").glob("**/events.out.tfevents.*"))
    if not files:
        return []
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    by_step: dict[int, dict[str, float]] = {}
    for path in files:
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalar = value.simple_value
                elif value.metadata.plugin_data.plugin_name == "scalars":
                    from tensorboard.util import tensor_util

                    scalar = float(tensor_util.make_ndarray(value.tensor))
                else:
                    continue
                by_step.setdefault(int(event.step), {"step": float(event.step)})[value.tag] = float(scalar)
    return [by_step[step] for step in sorted(by_step)]

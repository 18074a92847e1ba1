"""``doppel.run_logs``: the scalars come back from W&B's record file as W&B wrote them (the framing of
LevelDB's log format: records split across 32 KiB blocks, zero trailers), resumed runs merged by step.
A real file written by wandb itself is read in tests/e2e/test_train.py."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from doppel.run_logs import read_log, read_wandb_log, wandb_records

BLOCK = 32768


def _leveldb_log(records: list[bytes]) -> bytes:
    """LevelDB's log writer (doc/log_format.md) after W&B's 7-byte header, zlib's crc32 as W&B uses."""
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    for record in records:
        first, left = True, record
        while True:
            room = BLOCK - len(out) % BLOCK
            if room < 7:  # a header never straddles blocks: zero trailer
                out += bytes(room)
                room = BLOCK
            take = left[:room - 7]
            left = left[len(take):]
            kind = (1 if not left else 2) if first else (4 if not left else 3)
            crc = zlib.crc32(take, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
            out += struct.pack("<IHB", crc, len(take), kind) + take
            first = False
            if not left:
                break
    return bytes(out)


def _history(items: dict[str, object]) -> bytes:
    from wandb.proto import wandb_internal_pb2

    record = wandb_internal_pb2.Record()
    for key, value in items.items():
        item = record.history.item.add()
        item.key = key
        item.value_json = json.dumps(value)
    return record.SerializeToString()


def _write(run: Path, folder: str, rows: list[dict[str, object]], padding: int = 0) -> None:
    from wandb.proto import wandb_internal_pb2

    other = wandb_internal_pb2.Record()
    other.run.run_id = "x" * padding  # a large non-history record: the next ones cross block boundaries
    path = run / "wandb" / folder / f"run-{folder.rsplit('-', 1)[-1]}.wandb"
    path.parent.mkdir(parents=True)
    path.write_bytes(_leveldb_log([other.SerializeToString(), *map(_history, rows)]))


def test_records_split_across_blocks_come_back_whole(tmp_path):
    records = [b"a" * 10, b"b" * 70_000, b"c" * (BLOCK - 7 - 7 - 17 - 7 - 3), b"d" * 5, b""]
    path = tmp_path / "run-x.wandb"
    path.write_bytes(_leveldb_log(records))
    assert wandb_records(path) == records
    torn = _leveldb_log(records)[:-10]  # killed while writing "d": the whole records before it
    path.write_bytes(torn)
    assert wandb_records(path) == records[:3]
    corrupt = bytearray(_leveldb_log(records))
    corrupt[7 + 7 + 10 + 7 + 100] ^= 1  # a flipped bit in the second record: its checksum stops the read
    path.write_bytes(bytes(corrupt))
    assert wandb_records(path) == records[:1]
    path.write_bytes(b"PK\x03\x04" + bytes(20))
    with pytest.raises(ValueError, match="not a W&B record file"):
        wandb_records(path)


def test_the_history_rows_keep_lightnings_step_and_the_numbers_only(tmp_path):
    rows = [{"train/loss": 2.5 - s / 10, "epoch": s // 3, "trainer/global_step": s, "_step": s, "_runtime": 0.1,
             "eval/curve": {"_type": "image-file", "path": "x.png"}} for s in range(40)]
    _write(tmp_path, "offline-run-20261206_010203-abc", rows, padding=BLOCK)
    assert read_log(tmp_path) == [{"train/loss": 2.5 - s / 10, "epoch": float(s // 3), "step": float(s)}
                                  for s in range(40)]


def test_a_resumed_runs_later_file_replaces_the_steps_it_logged_again(tmp_path):
    first = [{"train/loss": 10.0 + s, "trainer/global_step": s} for s in range(8)]  # stopped after step 7
    second = [{"train/loss": 20.0 + s, "trainer/global_step": s} for s in range(5, 10)]  # resumed at step 5
    _write(tmp_path, "offline-run-20261206_020000-bbb", second)
    _write(tmp_path, "offline-run-20261206_010000-zzz", first)  # earlier by its time, whatever its id
    assert [(r["step"], r["train/loss"]) for r in read_wandb_log(tmp_path)] == [
        *[(float(s), 10.0 + s) for s in range(5)], *[(float(s), 20.0 + s) for s in range(5, 10)]]

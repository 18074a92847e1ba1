"""Start-up time of ``data=recordio`` on a large pack: reading the index and every image's label.

An InsightFace pack of --images images in --classes identities (tiny payloads: the images are not read at
start-up) is written once; then ``read_recordio`` (parse the .idx, gather every record header from a
memory map, check the identity records) is timed against the baseline of reading the .idx file's bytes,
the least any reader must do.

    python scripts/bench/recordio_startup.py --images 1000000 --classes 50000
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from doppel.data.readers.recordio import read_recordio, write_recordio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=50_000)
    args = parser.parse_args()
    per_class = args.images // args.classes
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.rec"
        write_recordio(path, ((c, (b"\xff\xd8\xff" + bytes([c % 256]) * 40 for _ in range(per_class)))
                              for c in range(args.classes)))
        read_recordio(str(path))  # warm: the files in the page cache, as on a second run
        start = time.perf_counter()
        path.with_suffix(".idx").read_bytes()
        baseline = time.perf_counter() - start
        start = time.perf_counter()
        data = read_recordio(str(path))
        took = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{len(data.labels):,} images, {len(data.class_names):,} identities: read_recordio {took:.2f} s, "
          f"reading the .idx bytes {baseline * 1000:.1f} ms (ratio {took / baseline:.0f}); "
          f"peak RSS of the process {peak:.0f} MB")


if __name__ == "__main__":
    main()

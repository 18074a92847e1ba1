"""Pack an image folder or a CSV manifest into an InsightFace RecordIO pack (train.rec + train.idx), read
fast by ``data=recordio`` and by InsightFace's own tools. Image files are stored as they are (no re-encoding).

    python scripts/pack_recordio.py --folder /data/faces --out /data/faces_rec/train.rec
    python scripts/pack_recordio.py --csv /data/list.csv --out /data/list_rec/train.rec
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from doppel.data.readers.csv_manifest import read_csv
from doppel.data.readers.folder import read_folder
from doppel.data.readers.recordio import write_recordio


def pack(source, out: Path) -> int:
    """Write ``source`` (an :class:`IdentityData` of encoded files) to ``out``; returns the image count."""
    labels = source.labels
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=len(source.class_names)).tolist()
    per_class = torch.split(order, counts)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_recordio(out, ((c, (source.images.fetch(int(i)) for i in images))
                                for c, images in enumerate(per_class)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--folder", help="root/<class>/<image>")
    group.add_argument("--csv", help="a manifest with path,label columns")
    parser.add_argument("--out", type=Path, required=True, help="the .rec to write (its .idx goes beside it)")
    args = parser.parse_args(argv)
    source = read_folder(args.folder) if args.folder else read_csv(args.csv)
    count = pack(source, args.out)
    print(f"wrote {count} images of {len(source.class_names)} classes to {args.out} and {args.out.with_suffix('.idx')}")


if __name__ == "__main__":
    main()

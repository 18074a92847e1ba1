"""Pack face verification pairs into an InsightFace ``.bin`` (the layout of lfw.bin, cfp_fp.bin,
agedb_30.bin). Image files are stored as they are (JPEG or PNG, aligned faces).

The pairs list is either ``path1 path2 same`` per line (same: 1 or 0; paths relative to --root), or
LFW's pairs.txt (a first line of counts, then ``name i j`` for a matched pair and ``name1 i name2 j``
for a mismatched one; images at root/name/name_0001.jpg).

    python scripts/pack_verification_bin.py --pairs pairs.txt --root lfw_aligned --out lfw.bin
"""

from __future__ import annotations

import argparse
from pathlib import Path

from doppel.data.readers.verification_bin import write_verification_bin


def read_pairs(pairs: Path, root: Path) -> tuple[list[Path], list[bool]]:
    lines = [line.split() for line in pairs.read_text().splitlines() if line.strip()]
    if lines and len(lines[0]) <= 2 and all(field.isdigit() for field in lines[0]):
        lines = lines[1:]  # LFW's header of fold and pair counts

    def lfw(name: str, number: str) -> Path:
        return root / name / f"{name}_{int(number):04d}.jpg"

    paths, issame = [], []
    for number, fields in enumerate(lines, 1):
        if len(fields) == 3 and fields[2] in ("0", "1") and not fields[1].isdigit():
            paths += [root / fields[0], root / fields[1]]
            issame.append(fields[2] == "1")
        elif len(fields) == 3:
            paths += [lfw(fields[0], fields[1]), lfw(fields[0], fields[2])]
            issame.append(True)
        elif len(fields) == 4:
            paths += [lfw(fields[0], fields[1]), lfw(fields[2], fields[3])]
            issame.append(False)
        else:
            raise ValueError(f"{pairs}, pair {number}: {' '.join(fields)!r} is neither 'path1 path2 same' nor LFW's "
                             "'name i j' / 'name1 i name2 j'.")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} does not exist ({len(missing)} images of {pairs} are missing): check "
                                "--root.")
    return paths, issame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--protocol", type=int, default=4, help="pickle protocol (2 for Python 2 readers)")
    args = parser.parse_args(argv)
    paths, issame = read_pairs(args.pairs, args.root)
    write_verification_bin(args.out, [p.read_bytes() for p in paths], issame, args.protocol)
    print(f"wrote {len(issame)} pairs ({sum(issame)} matched) to {args.out}")


if __name__ == "__main__":
    main()

"""IJB-C at its full size with random embeddings: how long reading the meta files and scoring take, and the
most memory each holds (docs/benchmarks.md, "IJB-C").

    python scripts/bench/ijb.py                      # IJB-C: 469,375 faces, 23,124 templates, 15,658,489 pairs
    python scripts/bench/ijb.py --faces 5000 --templates 400 --pairs 20000 --gallery 60 --probes 200  # a minute

The meta files are written in the release's formats to a temporary folder (not timed); the faces' pixels are
not needed (the embeddings are random), so loose_crop/ is empty. Memory is reported above what the process
held before each step, and against the size of the embeddings themselves (plain + mirrored, float32), the
one thing the evaluation must hold whole.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import _PeakResident, _resident_bytes  # noqa: E402  (one sampler of resident memory)

from doppel.evaluation.ijb import IJBProtocol  # noqa: E402
from doppel.evaluation.protocol import Embedded, Inputs  # noqa: E402

MB = 2 ** 20


def write_meta(folder: Path, args: argparse.Namespace, rng: np.random.Generator) -> None:
    """A release's meta files: every template has faces in 1-4 medias; the gallery holds one template per
    subject, each probe template is of a gallery subject; pairs are drawn between templates, 1 in 5 genuine."""
    meta = folder / "IJBC" / "meta"
    meta.mkdir(parents=True)
    (folder / "IJBC" / "loose_crop").mkdir()
    templates = np.r_[np.arange(args.templates), rng.integers(0, args.templates, args.faces - args.templates)]
    templates = np.sort(templates) + 1
    medias = templates * 4 + rng.integers(0, 4, args.faces)
    subjects = np.r_[np.arange(args.gallery), rng.integers(0, args.gallery, args.templates - args.gallery)] + 1
    names = np.char.add(np.arange(1, args.faces + 1).astype(str), ".jpg")
    landmarks = rng.uniform(20, 90, (args.faces, 10))
    scores = rng.uniform(0.5, 1.0, args.faces)
    with open(meta / "ijbc_name_5pts_score.txt", "w") as file:
        for name, points, score in zip(names, landmarks, scores):
            file.write(f"{name} {' '.join(f'{v:.3f}' for v in points)} {score:.6f}\n")
    np.savetxt(meta / "ijbc_face_tid_mid.txt", np.c_[names, templates, medias], fmt="%s")
    first = rng.integers(1, args.templates + 1, args.pairs)
    second = rng.integers(1, args.templates + 1, args.pairs)
    genuine = rng.random(args.pairs) < 0.2  # a genuine pair: the second template is one of the first's subject
    by_subject = {int(s): np.flatnonzero(subjects == s) + 1 for s in np.unique(subjects)}
    for index in np.flatnonzero(genuine):
        others = by_subject[int(subjects[first[index] - 1])]
        others = others[others != first[index]]
        if len(others):
            second[index] = rng.choice(others)
    labels = (subjects[first - 1] == subjects[second - 1]).astype(np.int64)
    np.savetxt(meta / "ijbc_template_pair_label.txt", np.c_[first, second, labels], fmt="%d")
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME"
    gallery = np.arange(1, args.gallery + 1)  # templates 1..gallery hold subjects 1..gallery
    probes = rng.choice(np.arange(args.gallery + 1, args.templates + 1), args.probes, replace=False)
    for stem, chosen in (("1N_gallery_G1", gallery[::2]), ("1N_gallery_G2", gallery[1::2]), ("1N_probe_mixed", probes)):
        rows = [f"{t},{subjects[t - 1]},img/{t}.jpg" for t in np.sort(chosen)]
        (meta / f"ijbc_{stem}.csv").write_text("\n".join([header, *rows]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=469_375)
    parser.add_argument("--templates", type=int, default=23_124)
    parser.add_argument("--pairs", type=int, default=15_658_489)
    parser.add_argument("--gallery", type=int, default=3_531, help="gallery templates (G1 + G2), one per subject")
    parser.add_argument("--probes", type=int, default=19_593)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        started = time.perf_counter()
        write_meta(folder, args, rng)
        print(f"meta files written in {time.perf_counter() - started:.1f} s (not part of the evaluation)", flush=True)
        before = _resident_bytes()
        started = time.perf_counter()
        with _PeakResident() as peak:
            protocol = IJBProtocol(root=str(folder))
            protocol.bind(None)
        read_seconds, read_peak = time.perf_counter() - started, peak.peak - before
        release = protocol.release
    generator = torch.Generator().manual_seed(0)
    plain = torch.randn(args.faces, args.dim, generator=generator)
    flipped = plain + 0.3 * torch.randn(args.faces, args.dim, generator=generator)
    embeddings = (plain.nbytes + flipped.nbytes) / MB
    before = _resident_bytes()
    started = time.perf_counter()
    with _PeakResident() as peak:
        result = protocol.evaluate(Inputs(split=None, pairs={"ijbc": Embedded(plain, flipped)}))
    score_seconds, score_peak = time.perf_counter() - started, peak.peak - before
    print(f"IJB-C size: {len(release.faces):,} faces, {len(np.unique(release.templates)):,} templates, "
          f"{len(release.pairs):,} pairs, 1:N {len(release.gallery.templates):,} gallery x "
          f"{len(release.probes.templates):,} probes, dimension {args.dim}, {args.threads} thread(s)")
    print(f"read the meta files:  {read_seconds:7.1f} s, peak {read_peak / MB:8.0f} MB above the start")
    print(f"score 1:1 and 1:N:    {score_seconds:7.1f} s, peak {score_peak / MB:8.0f} MB above the embeddings "
          f"({embeddings:.0f} MB; ratio {score_peak / MB / embeddings:.2f})")
    print("metrics (random embeddings: chance level): " + ", ".join(
        f"{k.split('/')[-1]} {v:.4f}" for k, v in result.metrics.items()))


if __name__ == "__main__":
    main()

"""A small IJB release written in the layout and text formats of insightface's ``IJB_release`` (see
doppel.data.readers.ijb): several images per media, a media shared by two templates, several medias per
template, genuine and impostor pairs, and the 1:N galleries and probes."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from doppel.data.align import ARCFACE_POINTS

HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT"


@dataclass
class Written:
    folder: Path  # the target's folder
    names: list[str]
    landmarks: np.ndarray  # [N, 5, 2]
    scores: np.ndarray  # [N]
    templates: np.ndarray
    medias: np.ndarray
    subjects: dict[int, int]  # template -> subject
    pairs: np.ndarray  # [P, 3]


def write_release(root: Path, target: str = "IJBC", subjects: int = 6, templates_per_subject: int = 3,
                  seed: int = 0, image_size: tuple[int, int] = (96, 80), identification: bool = True) -> Written:
    rng = np.random.default_rng(seed)
    folder = root / target
    (folder / "meta").mkdir(parents=True)
    (folder / "loose_crop").mkdir()
    names, templates, medias, template_subject = [], [], [], {}
    media = 1000
    template = 1
    for subject in range(subjects):
        for _ in range(templates_per_subject):
            template_subject[template] = 100 + subject
            for _ in range(int(rng.integers(1, 4))):  # medias of the template
                media += 1
                for _ in range(int(rng.integers(1, 4))):  # frames of the media
                    names.append(f"{len(names) + 1}.jpg")
                    templates.append(template)
                    medias.append(media)
            template += 1
    # a media shared by two templates of one subject (IJB's media ids are global): its frame in template 2
    names.append(f"{len(names) + 1}.jpg")
    templates.append(2)
    medias.append(medias[0])
    count = len(names)
    height, width = image_size
    base = ARCFACE_POINTS * (min(height, width) / 112) * 0.8 + [4.0, 6.0]
    landmarks = base[None] + rng.normal(0, 1.5, (count, 5, 2))
    scores = rng.uniform(0.5, 1.0, count)
    for name in names:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        (folder / "loose_crop" / name).write_bytes(buffer.getvalue())
    lower = target.lower()
    with open(folder / "meta" / f"{lower}_name_5pts_score.txt", "w") as file:
        for name, points, score in zip(names, landmarks, scores):
            file.write(f"{name} " + " ".join(f"{v:.3f}" for v in points.reshape(-1)) + f" {score:.6f}\n")
    with open(folder / "meta" / f"{lower}_face_tid_mid.txt", "w") as file:
        for name, t, m in zip(names, templates, medias):
            file.write(f"{name} {t} {m}\n")
    ids = sorted(template_subject)
    pairs = np.array([(a, b, int(template_subject[a] == template_subject[b])) for i, a in enumerate(ids)
                      for b in ids[i + 1:]])
    with open(folder / "meta" / f"{lower}_template_pair_label.txt", "w") as file:
        for a, b, label in pairs:
            file.write(f"{a} {b} {label}\n")
    if identification:
        first = {}
        for t in ids:
            first.setdefault(template_subject[t], t)
        half = subjects // 2
        galleries = ("G1", "G2") if target == "IJBC" else ("S1", "S2")
        chosen = {galleries[0]: [first[100 + s] for s in range(half)],
                  galleries[1]: [first[100 + s] for s in range(half, subjects)],
                  "probe_mixed": [t for t in ids if t not in first.values()]}
        for part, members in chosen.items():
            stem = f"1N_gallery_{part}" if part != "probe_mixed" else "1N_probe_mixed"
            with open(folder / "meta" / f"{lower}_{stem}.csv", "w") as file:
                file.write(HEADER + "\n")
                for t in members:
                    for name, owner in zip(names, templates):
                        if owner == t:
                            file.write(f"{t},{template_subject[t]},img/{name},1,0,0,{width},{height}\n")
    return Written(folder, names, landmarks.astype(np.float64), scores, np.array(templates), np.array(medias),
                   template_subject, pairs)

"""A run's final metrics recomputed independently from its last.ckpt.

The network is rebuilt from the run's config and loaded from the checkpoint; each evaluation image and
its mirror are embedded, summed and normalised (sec. 4.2.3); prototypes, nearest-prototype
classification among all of them, coverage at precision P and Recall@1 are plain loops written from the
definitions of sec. 4.2.6-4.2.7, without doppel.evaluation, in float64.

A barely trained network maps many images to nearly the same point, and a decision between two
neighbours closer than float32 can tell apart is arbitrary: such a decision (best and runner-up within
TIE of each other) counts as right for the upper bound and wrong for the lower one. Every metric grows
with the number of right decisions, so the run's value must lie within the bounds; without near-ties
the two bounds are one exact value.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from doppel.data.dataset import Part
from doppel.data.readers.rendered_npz import read_rendered_npz
from doppel.data.split import split_dataset

TIE = 1e-5


def _decision(similarities, candidate_labels, label):
    """(surely right, surely wrong) for the best match: near-ties with another label are neither."""
    best = similarities.max()
    near = {candidate_labels[j] for j in (similarities >= best - TIE).nonzero().flatten().tolist()}
    return near == {label}, label not in near


def _coverage(confidences, correct, precision):
    """Largest answered share at a confidence threshold whose answers have precision >= P."""
    pairs = sorted(zip(confidences, correct), key=lambda p: -p[0])
    best, hits = 0, 0
    for i, (confidence, right) in enumerate(pairs):
        hits += right
        last_of_tie = i + 1 == len(pairs) or pairs[i + 1][0] != confidence
        if last_of_tie and hits / (i + 1) >= precision - 1e-12:
            best = i + 1
    return best / len(pairs)


def _recall_at_1(vectors, labels):
    """(lower, upper) share of images (of labels seen twice or more) whose most similar other image has
    their label."""
    similarity = vectors @ vectors.T
    sure = unsure = total = 0
    for i in range(len(vectors)):
        if labels.count(labels[i]) < 2:
            continue
        row = similarity[i].clone()
        row[i] = float("-inf")  # not itself
        right, wrong = _decision(row, labels, labels[i])
        total += 1
        sure += right
        unsure += not right and not wrong
    return sure / total, (sure + unsure) / total


def reference_bounds(run_dir: Path, cfg) -> dict[str, tuple[float, float]]:
    data = cfg.data
    rendered = read_rendered_npz(data.path, data.bundled, data.prototype_vendor)
    split = split_dataset(rendered, data.novel_fraction, data.max_groups)
    images = rendered.images.images[split.index]
    net = instantiate(cfg.backbone, image_size=images.shape[-1])
    state = torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    net.eval()
    if cfg.speed.channels_last:
        net.to_channels_last()
    half = "bf16" in str(cfg.trainer.precision)  # the run embedded under bfloat16 autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        # the batches of the run's evaluation (batch norm is per image in eval mode anyway)
        batches = images.split(data.eval_batch_size)
        # the mirror trick where training mirrors; the two embeddings are summed in float32 (under
        # autocast the network's outputs are bfloat16)
        mirror = cfg.augment.mirror
        chunks = [F.normalize(net(x).float() + (net(x.flip(-1)).float() if mirror else 0), dim=1) for x in batches]
    embeddings = torch.cat(chunks).double()
    labels, roles = split.label.tolist(), split.part.tolist()

    prototypes = []  # (label, vector): base = normalised mean of its training images, novel = its one image
    for label in sorted({lab for lab, r in zip(labels, roles) if r == Part.TRAIN}):
        members = [embeddings[i] for i in range(len(labels)) if labels[i] == label and roles[i] == Part.TRAIN]
        prototypes.append((label, F.normalize(torch.stack(members).mean(0), dim=0)))
    prototypes += [(labels[i], embeddings[i]) for i in range(len(labels)) if roles[i] == Part.REFERENCE]

    bounds = {}
    prototype_labels = [label for label, _ in prototypes]
    prototype_matrix = torch.stack([vector for _, vector in prototypes])
    for split_name, query_role, member_roles in (("base", Part.HELD_OUT, (Part.TRAIN, Part.HELD_OUT)),
                                                 ("novel", Part.QUERY, (Part.REFERENCE, Part.QUERY))):
        confidences, right, not_wrong = [], [], []
        for i in (i for i in range(len(labels)) if roles[i] == query_role):
            similarities = prototype_matrix @ embeddings[i]  # against every prototype, base and novel
            sure, wrong = _decision(similarities, prototype_labels, labels[i])
            confidences.append(float(similarities.max().float()))  # ties as the run sees them, in float32
            right.append(sure)
            not_wrong.append(not wrong)
        members = [i for i in range(len(labels)) if roles[i] in member_roles]
        key = f"test/{split_name}"
        bounds[f"{key}/top1"] = (sum(right) / len(right), sum(not_wrong) / len(right))
        for p in (0.99, 0.999):
            bounds[f"{key}/coverage@{p}"] = (_coverage(confidences, right, p), _coverage(confidences, not_wrong, p))
        bounds[f"{key}/recall@1"] = _recall_at_1(embeddings[members], [labels[i] for i in members])
    return bounds


def assert_metrics_are_the_reference(run_dir: Path, cfg, metrics: dict[str, float]) -> None:
    for key, (low, high) in reference_bounds(run_dir, cfg).items():
        assert low - 1e-6 <= metrics[key] <= high + 1e-6, (key, metrics[key], low, high)

"""Ensembles (DM Table 6): a similarity is the mean of the networks' cosine similarities, each network
with its own prototypes."""

import pytest
import torch
import torch.nn.functional as F

from doppel.data.dataset import Part
from doppel.evaluation.protocol import Embedded, normalize_blocks
from doppel.evaluation.prototype import prototype_metrics
from doppel.models.ensemble import EnsembleNet


def test_dot_products_of_block_normalised_rows_are_mean_cosines():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3 * 4, generator=g), torch.randn(6, 3 * 4, generator=g)
    got = normalize_blocks(a, 3) @ normalize_blocks(b, 3).T
    for i in range(5):
        for j in range(6):
            cosines = [F.cosine_similarity(a[i, 4 * m:4 * m + 4], b[j, 4 * m:4 * m + 4], dim=0) for m in range(3)]
            assert got[i, j] == pytest.approx(float(sum(cosines) / 3), abs=1e-6)
    assert torch.allclose(normalize_blocks(a, 1), F.normalize(a, dim=1))


def test_prototype_answers_use_each_networks_own_prototypes():
    """Against a loop: per network, base prototypes are its normalised mean embeddings; a query's score for
    a class is the mean over networks of its cosine with that network's prototype."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(6).repeat_interleave(16)
    parts = torch.tensor(([0] * 6 + [1] * 10) * 6)  # 6 training images, 10 queries per class
    # network A separates the classes, network B is noise: their class sums differ in norm, so one
    # normalisation of the whole concatenation would weigh A more than the mean of cosines does
    good = torch.randn(6, 8, generator=g)[labels] * 1.2 + torch.randn(96, 8, generator=g)
    raw = torch.cat([good, torch.randn(96, 8, generator=g)], dim=1)
    metrics = prototype_metrics(Embedded(raw, None, labels, parts, blocks=2).fused(False), labels, parts, blocks=2)

    def top1(per_network_prototypes: bool) -> float:
        nets = [F.normalize(raw[:, :8], dim=1), F.normalize(raw[:, 8:], dim=1)]
        right = 0
        for i in torch.nonzero(parts == Part.HELD_OUT).flatten().tolist():
            scores = []
            for c in range(6):
                members = (labels == c) & (parts == Part.TRAIN)
                if per_network_prototypes:
                    score = sum(float(e[i] @ F.normalize(e[members].sum(0), dim=0)) for e in nets) / 2
                else:
                    joint = torch.cat([e[members].sum(0) for e in nets])
                    score = float(torch.cat([e[i] for e in nets]) @ F.normalize(joint, dim=0))
                scores.append(score)
            right += max(range(6), key=scores.__getitem__) == int(labels[i])
        return right / 60

    assert metrics["base/top1"] == pytest.approx(top1(per_network_prototypes=True))
    assert top1(per_network_prototypes=True) != top1(per_network_prototypes=False)  # the test can tell


def test_an_ensemble_embeds_with_each_network_side_by_side():
    nets = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    for net in nets:
        net.embedding_dim = 2
    ensemble = EnsembleNet(nets)
    x = torch.randn(4, 3)
    assert torch.equal(ensemble(x), torch.cat([nets[0](x), nets[1](x)], dim=1))
    assert (ensemble.blocks, ensemble.embedding_dim) == (2, 4)
    with pytest.raises(ValueError, match="at least two"):
        EnsembleNet(nets[:1])

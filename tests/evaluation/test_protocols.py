"""The protocols as the evaluator runs them: which images they score, the mirror fusion, the modes, and
their numbers against independent references (InsightFace's procedure, scikit-learn, hand-computed cases)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve as sklearn_roc_curve

from doppel.data.dataset import Part
from doppel.evaluation.classification import ClassificationProtocol
from doppel.evaluation.evaluator import Evaluator
from doppel.evaluation.protocol import DataFacts, Embedded, Inputs
from doppel.evaluation.prototype import PrototypeProtocol
from doppel.evaluation.retrieval import RetrievalProtocol
from doppel.evaluation.verification import VerificationProtocol, roc_curve, tar_at_far
from tests.evaluation.test_verification import insightface_accuracy


def facts(parts, references_given=False, benchmark=None) -> DataFacts:
    return DataFacts(parts=torch.tensor([int(p) for p in parts]), references_given=references_given,
                     benchmark=benchmark, folder=None, locate=lambda path, key: Path(path))


def test_the_module_embeds_each_image_and_its_horizontal_mirror():
    """The flipped embeddings are the backbone's on images mirrored left-right (the last axis): a backbone
    that tells left from right and top from bottom catches a flip of any other axis, or none."""
    from doppel.module import DoppelModule

    class Lopsided(torch.nn.Module):
        def forward(self, images):  # (left column, top row) sums: changes under either flip
            return torch.stack([images[..., 0].sum((1, 2)), images[..., 0, :].sum((1, 2))], dim=1)

    evaluator = Evaluator({"prototype": PrototypeProtocol()})
    evaluator.sets, evaluator.flips, evaluator.sizes = ["split"], [True], [2]
    module = DoppelModule(Lopsided(), loss_set=None, optimizer=None, evaluator=evaluator)
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    module._eval_step((images, torch.tensor([1, 0])), 0)
    index, plain, flipped = evaluator._rows[0][0]
    assert torch.equal(index, torch.tensor([1, 0]))
    assert torch.equal(plain, Lopsided()(images))
    assert torch.equal(flipped, Lopsided()(torch.flip(images, dims=[3])))
    assert not torch.equal(flipped, plain) and not torch.equal(flipped, Lopsided()(torch.flip(images, dims=[2])))


def test_fusion_sums_before_normalising():
    plain, flipped = torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 3.0]])
    assert torch.allclose(Embedded(plain, flipped).fused(True), torch.tensor([[0.5**0.5, 0.5**0.5]]))
    assert torch.allclose(Embedded(plain, flipped).fused(False), torch.nn.functional.normalize(plain, dim=1))


@pytest.mark.parametrize("pairs", [300, 617])
def test_verification_protocol_is_insightface_with_flip_sum_fusion(pairs):
    generator = torch.Generator().manual_seed(pairs)
    issame = torch.rand(pairs, generator=generator) < 0.5
    base = torch.randn(pairs, 8, generator=generator)
    partner = torch.where(issame[:, None], base + 0.9 * torch.randn(pairs, 8, generator=generator),
                          torch.randn(pairs, 8, generator=generator))
    plain = torch.stack([base, partner], 1).flatten(0, 1)
    flipped = plain + 0.8 * torch.randn(plain.shape, generator=generator)  # the mirror's embedding differs
    protocol = VerificationProtocol(packs=["lfw.bin"])
    protocol.pairs = {"lfw": type("Pairs", (), {"issame": issame})()}
    metrics = protocol.evaluate(Inputs(split=None, pairs={"lfw": Embedded(plain, flipped)})).metrics
    # InsightFace: embeddings of the image and its flip summed, then sklearn's normalize, then 10 folds.
    fused = (plain + flipped).double().numpy()
    mean, std = insightface_accuracy(fused, issame.numpy())
    assert metrics["lfw/accuracy"] == pytest.approx(mean, abs=1e-12)
    assert metrics["lfw/accuracy_std"] == pytest.approx(std, abs=1e-12)
    without_flip = insightface_accuracy(plain.double().numpy(), issame.numpy())[0]
    assert without_flip != pytest.approx(mean, abs=1e-9)  # the fusion changes the number: the test sees it
    # TAR@FAR and the ROC from cosine similarity, against scikit-learn's roc_curve
    unit = fused / np.linalg.norm(fused, axis=1, keepdims=True)
    scores = (unit[0::2] * unit[1::2]).sum(1)
    fpr, tpr, _ = sklearn_roc_curve(issame.numpy(), scores, drop_intermediate=False)
    for far in (1e-3, 1e-2, 0.1):
        expected = tpr[fpr <= far].max()
        assert tar_at_far(torch.from_numpy(scores), issame, far) == pytest.approx(expected, abs=1e-12)
    assert metrics["lfw/tar@far=0.001"] == pytest.approx(tpr[fpr <= 1e-3].max(), abs=1e-12)
    ours_far, ours_tar = roc_curve(torch.from_numpy(scores), issame)
    assert np.allclose(ours_far.numpy(), fpr) and np.allclose(ours_tar.numpy(), tpr)


def test_verification_threshold_is_the_mean_of_the_folds_choices():
    # pair i's squared distance is d_i; same pairs below 1.0, different above: every fold picks its
    # first threshold that separates them, the smallest t with t > max same distance (0.853) -> 0.86
    d = torch.tensor([0.2, 1.5, 0.853, 1.8] * 5)
    issame = torch.tensor([True, False, True, False] * 5)
    angles = torch.arccos(1 - d / 2)  # unit vectors at squared distance d
    first = torch.stack([torch.ones(20), torch.zeros(20)], 1)
    second = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    plain = torch.stack([first, second], 1).flatten(0, 1)
    protocol = VerificationProtocol(packs=["x.bin"], flip=False)
    protocol.pairs = {"x": type("Pairs", (), {"issame": issame})()}
    metrics = protocol.evaluate(Inputs(split=None, pairs={"x": Embedded(plain, None)})).metrics
    assert metrics["x/accuracy"] == 1.0 and metrics["x/threshold"] == pytest.approx(0.86)


def test_retrieval_mode_and_ks_follow_the_data():
    cub = RetrievalProtocol()
    cub.bind(facts([Part.TRAIN, Part.REFERENCE, Part.QUERY, Part.QUERY], benchmark="cub"))
    assert cub.mode == "leave_one_out" and cub.ks == (1, 2, 4, 8, 16, 32) and cub.parts() == {Part.REFERENCE,
                                                                                                 Part.QUERY}
    inshop = RetrievalProtocol()
    inshop.bind(facts([Part.TRAIN, Part.REFERENCE, Part.QUERY], references_given=True, benchmark="inshop"))
    assert inshop.mode == "query_gallery" and inshop.ks == (1, 10, 20, 30, 40, 50)
    sop = RetrievalProtocol(ks=[1, 10])
    sop.bind(facts([Part.TRAIN, Part.REFERENCE, Part.QUERY], benchmark="sop"))
    assert sop.ks == (1, 10) and sop.metric_names()[:2] == ["retrieval/recall@1", "retrieval/recall@10"]
    closed = RetrievalProtocol()
    closed.bind(facts([Part.TRAIN, Part.HELD_OUT]))
    assert closed.parts() == {Part.HELD_OUT}
    with pytest.raises(ValueError, match="mode=query_gallery needs query and gallery"):
        RetrievalProtocol(mode="query_gallery").bind(facts([Part.TRAIN, Part.HELD_OUT]))


def test_retrieval_protocol_searches_the_gallery_or_all_others():
    """Classes 0 and 1, two images each, at angles; in leave-one-out each image finds its twin, against
    the gallery the query at 50 degrees finds class 1's gallery image (at 80) before class 0's (at 0)."""
    angles = torch.tensor([0.0, 10.0, 80.0, 90.0, 50.0])
    plain = torch.stack([torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))], 1)
    labels = torch.tensor([0, 0, 1, 1, 0])
    parts = torch.tensor([Part.REFERENCE, Part.QUERY, Part.REFERENCE, Part.QUERY, Part.QUERY])
    split = Embedded(plain, None, labels, parts)
    gallery = RetrievalProtocol(ks=[1, 2], mode="query_gallery", clustering=False)
    gallery.bind(facts(parts.tolist()))
    m = gallery.evaluate(Inputs(split=split)).metrics
    # queries: 10 deg (class 0) -> gallery 0 deg: hit; 90 (class 1) -> 80: hit; 50 (class 0) -> 80: miss, then 0
    assert m["retrieval/recall@1"] == pytest.approx(2 / 3) and m["retrieval/recall@2"] == 1.0
    loo = RetrievalProtocol(ks=[1], mode="leave_one_out", clustering=True)
    loo.bind(facts(parts.tolist()))
    m = loo.evaluate(Inputs(split=split)).metrics
    # leave-one-out among all five: 0<->10, 80<->90 hit; 50's nearest is 80 (30 deg) vs 10 (40): miss
    assert m["retrieval/recall@1"] == pytest.approx(4 / 5)
    # k-means with K = 2 test classes: 50 joins {80, 90} (nearer their centre): pairs together {0,10},
    # {50,80}, {50,90}, {80,90}; same class {0,10}, {0,50}, {10,50}, {80,90}: precision 2/4, recall 2/4
    assert m["retrieval/f1"] == pytest.approx(0.5)
    from sklearn.metrics import normalized_mutual_info_score

    assert m["retrieval/nmi"] == pytest.approx(normalized_mutual_info_score(labels, [0, 0, 1, 1, 1]))


def test_classification_scores_held_out_images_with_the_training_classifier():
    classifier = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    plain = torch.tensor([[2.0, 1.0], [0.0, 5.0], [-1.0, -2.0], [3.0, 4.0], [9.0, 9.0]])
    labels = torch.tensor([0, 1, 2, 0, 0])
    parts = torch.tensor([Part.HELD_OUT] * 4 + [Part.TRAIN])  # the training image is not scored
    protocol = ClassificationProtocol()
    protocol.bind(facts(parts.tolist()))
    m = protocol.evaluate(Inputs(split=Embedded(plain, None, labels, parts), classify=classifier)).metrics
    assert m["classification/top1"] == pytest.approx(3 / 4)  # [3, 4] is predicted 1
    with pytest.raises(ValueError, match="has none: use a loss with a classifier"):
        protocol.evaluate(Inputs(split=Embedded(plain, None, labels, parts), classify=None))


def test_prototype_protocol_reports_only_the_splits_the_data_has():
    protocol = PrototypeProtocol()
    protocol.bind(facts([Part.TRAIN, Part.HELD_OUT]))
    assert protocol.metric_names() == ["base/top1", "base/coverage@0.99", "base/coverage@0.999", "base/recall@1"]
    assert protocol.headline == "base/coverage@0.99"
    with pytest.raises(ValueError, match="needs base queries"):
        PrototypeProtocol().bind(facts([Part.TRAIN, Part.TRAIN]))


def test_a_misspelt_objective_lists_the_metrics_of_the_run(tmp_path):
    from doppel.config import resolve_objective

    evaluator = Evaluator({"prototype": PrototypeProtocol(), "retrieval": RetrievalProtocol(ks=[1, 4])})
    for protocol in evaluator.protocols.values():
        protocol.bind(facts([Part.TRAIN, Part.HELD_OUT, Part.REFERENCE, Part.QUERY]))
    assert resolve_objective("auto", evaluator) == "test/novel/coverage@0.99"
    assert resolve_objective("test/retrieval/map@r", evaluator) == "test/retrieval/map@r"
    with pytest.raises(ValueError, match=r"objective=test/retrieval/recall@2 is not a metric of this run; choose "
                                         r"one of: .*test/retrieval/recall@4"):
        resolve_objective("test/retrieval/recall@2", evaluator)


def test_the_figures_draw_the_numbers_the_metrics_report():
    """The precision-coverage curve ends at (coverage 1, precision = top-1) and its last point at 99%
    precision is coverage@0.99; the Recall@K bars are the recall metrics."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(15, 8, generator=generator), dim=1)
    labels = torch.arange(15).repeat_interleave(5)
    plain = centres[labels] + 0.35 * torch.randn(len(labels), 8, generator=generator)
    parts = torch.tensor([Part.REFERENCE if i % 5 == 0 else Part.QUERY for i in range(len(labels))])
    protocol = PrototypeProtocol(flip=False)
    protocol.bind(facts(parts.tolist()))
    result = protocol.evaluate(Inputs(split=Embedded(plain, None, labels, parts)))
    metrics = result.metrics
    [(stem, figure)] = protocol.figures(result)
    [line] = [line for line in figure.axes[0].lines if line.get_label() == "novel"]
    coverage, precision = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    assert 0 < metrics["novel/top1"] < 1 and 0 < metrics["novel/coverage@0.99"] < 1  # neither end is trivial
    assert coverage[-1] == pytest.approx(1.0) and precision[-1] == pytest.approx(metrics["novel/top1"])
    assert coverage[precision >= 0.99].max() == pytest.approx(metrics["novel/coverage@0.99"])
    retrieval = RetrievalProtocol(ks=[1, 2, 4], mode="leave_one_out", clustering=False)
    retrieval.bind(facts([Part.QUERY] * len(labels)))
    searched = retrieval.evaluate(Inputs(split=Embedded(plain, None, labels, parts)))
    recalls = searched.metrics
    [(_, bars)] = retrieval.figures(searched)
    heights = [patch.get_height() for patch in bars.axes[0].patches]
    assert heights == pytest.approx([100 * recalls[f"retrieval/recall@{k}"] for k in (1, 2, 4)])


def test_novel_queries_compete_with_base_prototypes_without_base_queries():
    """No HELD_OUT image (recordio's default): a novel query still meets every base prototype. By hand:
    base class 0's mean is along [1, 0.1]; the class-6 query [0.6, -0.8] is nearest to it (cos 0.52)
    and so wrong, while among the novel prototypes alone it would be right (cos -0.6 beats -0.8)."""
    plain = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [-1.0, 0.0], [0.1, 1.0], [0.6, -0.8]])
    labels = torch.tensor([0, 0, 5, 6, 5, 6])
    parts = torch.tensor([Part.TRAIN, Part.TRAIN, Part.REFERENCE, Part.REFERENCE, Part.QUERY, Part.QUERY])
    protocol = PrototypeProtocol(flip=False, precisions=(0.99,))
    protocol.bind(facts(parts.tolist()))
    assert Part.TRAIN in protocol.parts()  # the evaluator embeds the training images for the base means
    metrics = protocol.evaluate(Inputs(split=Embedded(plain, None, labels, parts))).metrics
    assert metrics["novel/top1"] == pytest.approx(0.5)
    assert metrics["novel/coverage@0.99"] == pytest.approx(0.5)  # the right answer is the confident one
    assert protocol.metric_names() == ["novel/top1", "novel/coverage@0.99", "novel/recall@1"]
    # base_prototypes=classifier: base class 0 is its classifier vector [-1, 0.3] (normalised), no TRAIN
    # image is needed, and the query is right (cos -0.80 < -0.6)
    by_weights = PrototypeProtocol(flip=False, precisions=(0.99,), base_prototypes="classifier")
    by_weights.bind(facts(parts.tolist()))
    assert by_weights.parts() == {Part.REFERENCE, Part.QUERY} and by_weights.needs_classifier
    scored = by_weights.evaluate(Inputs(split=Embedded(plain, None, labels, parts),
                                        class_vectors=lambda: torch.tensor([[-10.0, 3.0]]))).metrics
    assert scored["novel/top1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="base_prototypes=classifier needs the loss's classifier"):
        by_weights.evaluate(Inputs(split=Embedded(plain, None, labels, parts)))
    with pytest.raises(ValueError, match=r"eval.prototype.base_prototypes='centre' must be one of"):
        PrototypeProtocol(base_prototypes="centre")


def test_base_queries_meet_classifier_prototypes_row_by_run_label():
    """With base_prototypes=classifier the prototype of base class c is row c of the class vectors, and
    base Recall@1 (a search of the training images) is not reported."""
    plain = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.0, 1.0], [0.7, 0.7]])
    labels = torch.tensor([0, 1, 2, 2])
    parts = torch.tensor([Part.HELD_OUT, Part.HELD_OUT, Part.REFERENCE, Part.QUERY])
    protocol = PrototypeProtocol(flip=False, precisions=(0.99,), base_prototypes="classifier")
    protocol.bind(facts([Part.TRAIN, *parts.tolist()]))
    assert protocol.metric_names() == ["base/top1", "base/coverage@0.99", "novel/top1", "novel/coverage@0.99",
                                       "novel/recall@1"]
    vectors = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # class 0 along x, class 1 along y
    metrics = protocol.evaluate(Inputs(split=Embedded(plain, None, labels, parts),
                                       class_vectors=lambda: vectors)).metrics
    assert metrics["base/top1"] == 1.0 and "base/recall@1" not in metrics
    # rows swapped: both base queries are wrong
    swapped = protocol.evaluate(Inputs(split=Embedded(plain, None, labels, parts),
                                       class_vectors=lambda: vectors.flip(0))).metrics
    assert swapped["base/top1"] == 0.0


def test_mirrored_images_are_embedded_when_any_protocol_fuses_them():
    """eval=[prototype,retrieval]: the prototype protocol fuses mirrored embeddings and retrieval does not;
    the split's images are embedded mirrored too, whichever protocol comes last."""
    from types import SimpleNamespace

    from doppel.data.split import Split

    parts = torch.tensor([Part.TRAIN, Part.TRAIN, Part.REFERENCE, Part.QUERY, Part.REFERENCE, Part.QUERY])
    split = Split(index=torch.arange(6), label=torch.tensor([0, 0, 1, 1, 2, 2]), part=parts,
                  names=["a", "b", "c"], num_classes=1)
    requested = {}
    for order in (("prototype", "retrieval"), ("retrieval", "prototype")):
        made = {"prototype": PrototypeProtocol(flip=True), "retrieval": RetrievalProtocol(flip=False, ks=[1])}
        requested.clear()
        datamodule = SimpleNamespace(setup=lambda: None, split=split, benchmark=None, folder=None,
                                     locate=lambda path, key: Path(path),
                                     evaluate_on=lambda positions, pairs: requested.update(positions=positions))
        evaluator = Evaluator({name: made[name] for name in order})
        evaluator.bind(datamodule)
        assert evaluator.sets == ["split"] and evaluator.flips == [True], order
        assert requested["positions"].tolist() == [0, 1, 2, 3, 4, 5]


def test_retrieval_of_classes_with_one_image_is_refused_or_counted_never_nan():
    """Leave-one-out retrieval: a query whose class has no other image has nothing to find. None findable:
    refused when the protocol is bound (it was NaN for every metric and NMI 1.0); some: left out, said."""
    parts = [Part.REFERENCE, Part.QUERY, Part.REFERENCE]
    singletons = facts(parts)
    singletons.labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="none of the 3 queries has another image of its class to retrieve"):
        RetrievalProtocol(ks=[1]).bind(singletons)
    some = facts(parts + [Part.QUERY])
    some.labels = torch.tensor([0, 1, 2, 2])
    with pytest.warns(UserWarning, match="2 of 4 queries have no other image of their class to retrieve"):
        RetrievalProtocol(ks=[1]).bind(some)


def test_an_undefined_metric_is_an_error_not_a_nan_in_metrics_json():
    """Whatever a protocol returns, NaN never leaves the evaluator as a number."""
    from doppel.evaluation.protocol import Protocol, Result

    class Undefined(Protocol):
        def bind(self, facts):
            pass

        def metric_names(self):
            return ["undefined/score"]

        def evaluate(self, inputs):
            return Result({"undefined/score": float("nan"), "undefined/fine": 1.0})

    evaluator = Evaluator({"undefined": Undefined()})
    with pytest.raises(FloatingPointError, match=r"test metrics undefined/score are undefined \(NaN\)"):
        evaluator.compute(None, "test")


@pytest.mark.parametrize("same", [True, False])
def test_a_pack_of_one_kind_of_pair_is_refused_when_bound(tmp_path, same):
    """Without impostor (or genuine) pairs there is no threshold to choose: named when the pack is bound,
    before training, not at the first validation."""
    from doppel.data.readers.verification_bin import write_verification_bin
    from tests.data.test_verification_bin import PNG

    write_verification_bin(tmp_path / "lfw.bin", [PNG] * 20, [same] * 10)
    kind = "genuine" if same else "impostor"
    wanted = "impostor \\(different-identity\\)" if same else "genuine \\(same-identity\\)"
    with pytest.raises(ValueError, match=rf"lfw.bin: all 10 pairs are {kind}: a verification pack needs {wanted} "
                                         "pairs too"):
        VerificationProtocol(packs=[str(tmp_path / "lfw.bin")], folds=10).bind(facts([Part.TRAIN]))


def test_packs_named_with_a_root_are_read_from_that_root(tmp_path):
    """eval.verification.root with packs names: the names are looked up in root (root was ignored)."""
    from doppel.data.readers.verification_bin import write_verification_bin
    from tests.data.test_verification_bin import PNG

    (tmp_path / "packs").mkdir()
    write_verification_bin(tmp_path / "packs" / "agedb_30.bin", [PNG] * 20, [True, False] * 5)
    protocol = VerificationProtocol(packs=["agedb_30.bin"], root=str(tmp_path / "packs"), folds=10)
    protocol.bind(facts([Part.TRAIN]))  # facts.locate would look in the working directory only
    assert protocol.paths == [tmp_path / "packs" / "agedb_30.bin"]
    with pytest.raises(FileNotFoundError, match=r"'lfw.bin' is not in eval.verification.root \(.*packs/lfw.bin"):
        VerificationProtocol(packs=["lfw.bin"], root=str(tmp_path / "packs")).bind(facts([Part.TRAIN]))

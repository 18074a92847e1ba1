"""eval.py's function: a checkpoint scored again gives the run's final numbers; an external backbone is
scored without any training code."""

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from doppel.evaluate import evaluate
from doppel.train import train
from tests.conftest import compose_cfg


def test_a_checkpoint_scores_what_its_run_reported_and_other_protocols_on_request(tmp_path):
    run = train(compose_cfg(tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(tmp_path / "again", [f"ckpt_path={checkpoint}", "data.max_groups=10"])
    again = evaluate(cfg, overrides=[f"ckpt_path={checkpoint}"])  # data.max_groups=10 only in cfg: ignored
    assert again == {k: v for k, v in run.items() if k.startswith("test/")}
    assert json.loads((tmp_path / "again" / "metrics.json").read_text()) == pytest.approx(again)
    # a protocol chosen on the command line replaces the run's; the run's data settings stay
    cfg = compose_cfg(tmp_path / "retrieval", [f"ckpt_path={checkpoint}", "eval=retrieval", "eval.retrieval.ks=[1]"])
    other = evaluate(cfg, overrides=[f"ckpt_path={checkpoint}", "eval=retrieval", "eval.retrieval.ks=[1]"])
    assert sorted(other) == sorted(f"test/retrieval/{m}" for m in ("recall@1", "precision@1", "r_precision",
                                                                   "map@r", "nmi", "f1"))
    assert other["test/retrieval/recall@1"] == pytest.approx(other["test/retrieval/precision@1"])
    assert (tmp_path / "retrieval" / "recall_at_k.png").stat().st_size > 1000


def test_an_external_backbone_is_scored_from_its_weights_file(tmp_path):
    """A timm model's weights file, its pooled features as the embedding: the metrics equal retrieval on
    the features computed here directly from the same weights."""
    import timm

    from doppel.data.dataset import Part
    from doppel.evaluation.metrics import retrieval_metrics

    weights = tmp_path / "resnet10t.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), weights)
    overrides = ["backbone=timm", "backbone.model=resnet10t", f"backbone.pretrained_path={weights}",
                 "backbone.embedding_dim=null", "backbone.input_size=32", "eval=retrieval", "eval.retrieval.ks=[1,4]",
                 "eval.retrieval.clustering=false", "data.max_groups=40"]
    cfg = compose_cfg(tmp_path, overrides, tiny_backbone=False)
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
    metrics = evaluate(cfg, overrides)
    datamodule = __import__("hydra.utils", fromlist=["instantiate"]).instantiate(cfg.data)
    datamodule.setup()
    split = datamodule.split
    searched = split.positions({Part.REFERENCE, Part.QUERY})
    images = torch.stack([datamodule._dataset(searched, train=False)[i][0] for i in range(len(searched))])
    from doppel.models import get_backbone

    net = get_backbone("timm", model="resnet10t", pretrained_path=str(weights), embedding_dim=None, input_size=32)
    net.eval()
    with torch.no_grad():
        features = F.normalize(net(images), dim=1)
    expected = retrieval_metrics(features, split.label[searched], ks=(1, 4))
    for name in ("recall@1", "recall@4", "map@r"):
        assert metrics[f"test/retrieval/{name}"] == pytest.approx(expected[name], abs=1e-6), name
    assert 0 < metrics["test/retrieval/recall@4"] < 1


def test_eval_py_learns_the_stage_2_classifier_on_a_checkpoint(tmp_path):
    """Untrained, the new classifier answers as the prototypes; trained (the paper's 500 steps), it reports
    its own metrics and curve."""
    train(compose_cfg(tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    overrides = [f"ckpt_path={checkpoint}", "eval=[prototype,classifier_learning]",
                 "eval.classifier_learning.iterations=0"]
    start = evaluate(compose_cfg(tmp_path / "start", overrides), overrides)
    for split in ("base", "novel"):
        assert start[f"test/classifier_learning/{split}/top1"] == start[f"test/{split}/top1"]
    overrides = [f"ckpt_path={checkpoint}", "eval=classifier_learning"]
    trained = evaluate(compose_cfg(tmp_path / "trained", overrides), overrides)
    assert sorted(trained) == sorted(f"test/classifier_learning/{split}/{measure}" for split in ("base", "novel")
                                     for measure in ("top1", "coverage@0.99", "coverage@0.999"))
    assert (tmp_path / "trained" / "classifier_precision_coverage.png").stat().st_size > 1000
    probe = [f"ckpt_path={checkpoint}", "eval=linear_probe"]  # trains under Lightning's inference mode too
    assert list(evaluate(compose_cfg(tmp_path / "probe", probe), probe)) == ["test/linear_probe/top1"]


def test_eval_py_scores_checkpoints_as_an_ensemble(tmp_path):
    """The same network twice scores as itself (the mean of two equal cosines); two networks give the
    ensemble's own numbers; a protocol that needs a classifier is refused."""
    for seed in (0, 1):
        train(compose_cfg(tmp_path / f"run{seed}", [f"seed={seed}"]))
    first, second = (tmp_path / f"run{seed}" / "checkpoints" / "last.ckpt" for seed in (0, 1))
    single = evaluate(compose_cfg(tmp_path / "one", [f"ckpt_path={first}"]), [f"ckpt_path={first}"])
    twice = [f"ckpt_path=[{first},{first}]"]
    assert evaluate(compose_cfg(tmp_path / "twice", twice), twice) == pytest.approx(single, abs=1e-6)
    both = [f"ckpt_path=[{first},{second}]"]
    cfg = compose_cfg(tmp_path / "both", both)
    ensemble = evaluate(cfg, both)
    assert sorted(ensemble) == sorted(single) and ensemble != single
    # the same numbers from the two networks' embeddings of the split, computed here
    from hydra.utils import instantiate

    from doppel.evaluation.protocol import normalize_blocks
    from doppel.evaluation.prototype import prototype_metrics

    datamodule = instantiate(cfg.data)
    datamodule.setup()
    split = datamodule.split
    images = torch.stack([datamodule._dataset(torch.arange(len(split.label)), train=False)[i][0]
                          for i in range(len(split.label))])
    embeddings = []
    for path in (first, second):
        net = instantiate(cfg.backbone, image_size=32)
        state = torch.load(path, weights_only=True)["state_dict"]
        net.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
        with torch.no_grad():
            embeddings.append(net.eval()(images))
    expected = prototype_metrics(normalize_blocks(torch.cat(embeddings, dim=1), 2), split.label, split.part,
                                 blocks=2)
    assert ensemble == pytest.approx({f"test/{k}": v for k, v in expected.items()}, abs=1e-6)
    refused = [f"ckpt_path=[{first},{second}]", "eval=classification"]
    with pytest.raises(ValueError, match="ensemble"):
        evaluate(compose_cfg(tmp_path / "refused", refused), refused)


def test_without_base_queries_novel_queries_meet_every_base_prototype(tmp_path):
    """data.base_queries=false (recordio's default): the run's novel metrics are those of every novel query
    classified among all base and novel prototypes, recomputed here from the checkpoint's network; eval.py
    with base_prototypes=classifier uses the classifier's weight rows as the base prototypes."""
    from hydra.utils import instantiate

    from doppel.evaluation.prototype import prototype_metrics

    run = train(compose_cfg(tmp_path / "run", ["data.base_queries=false"]))
    assert sorted(run) == sorted(k for k in run if not k.startswith("test/base/"))  # no base queries
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(tmp_path / "run", ["data.base_queries=false"])
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    split = datamodule.split
    images = torch.stack([datamodule._dataset(torch.arange(len(split.label)), train=False)[i][0]
                          for i in range(len(split.label))])
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    net = instantiate(cfg.backbone, image_size=32)
    net.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    with torch.no_grad():
        embeddings = F.normalize(net.eval()(images), dim=1)
    expected = prototype_metrics(embeddings, split.label, split.part)
    assert {k: v for k, v in run.items() if k.startswith("test/novel/")} == \
        pytest.approx({f"test/{k}": v for k, v in expected.items()}, abs=1e-6)
    novel_only = prototype_metrics(embeddings, split.label, split.part, class_vectors=torch.zeros(0, 16))
    assert novel_only["novel/top1"] > expected["novel/top1"]  # what the novel prototypes alone would give

    overrides = [f"ckpt_path={checkpoint}", "eval.prototype.base_prototypes=classifier"]
    by_weights = evaluate(compose_cfg(tmp_path / "weights", overrides), overrides)
    [weights] = [v for k, v in state.items() if k.endswith("classifier.weight")]
    expected = prototype_metrics(embeddings, split.label, split.part, class_vectors=weights)
    assert by_weights == pytest.approx({f"test/{k}": v for k, v in expected.items()}, abs=1e-6)
    assert by_weights["test/novel/top1"] != run["test/novel/top1"]  # the two choices differ

"""What the model and the miner are doing, as pictures: written into ``<run>/diagnostics/`` (PNG and the
numbers behind each as JSON) and, with ``logger=wandb`` or ``logger=tensorboard``, sent as images, tables and
histograms.

- every epoch: the raw embedding norms of the training batches, as a histogram and their mean / variance
  (the SEC paper's quantity; logged as ``embedding/norm_mean`` and ``embedding/norm_var``);
- every ``every_n_epochs`` epochs and the last one, when the doppelganger table is mined: the gallery
  (the top hubs and a fixed random sample of identities, each next to its current doppelgangers, with
  the classifier's score of the identity's image for its own class and for each doppelganger) and the
  hub bar chart;
- at every evaluation: a PCA projection of a fixed subset of the evaluation embeddings coloured by family
  (emoji family, else identity) and, at validations, the protocols' curves (the final ones are the run's
  own ``precision_coverage.png`` etc.).

The time spent here per epoch is written to ``diagnostics/seconds.json`` beside the epoch's training time
(training and validation, without the pictures).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytorch_lightning as pl
import torch

from doppel.callbacks import figures
from doppel.callbacks.doppelganger_mining import DoppelgangerMining
from doppel.loggers import log_media
from doppel.seeding import stable_seed


class Diagnostics(pl.Callback):
    def __init__(self, every_n_epochs: int = 1, gallery_hubs: int = 6, gallery_random: int = 6,
                 hubs_chart: int = 15, norm_bins: int = 40, projection_families: int = 12,
                 projection_points: int = 1500, folder: str = "diagnostics") -> None:
        settings = {"every_n_epochs": (every_n_epochs, 1), "gallery_hubs": (gallery_hubs, 0),
                    "gallery_random": (gallery_random, 0), "hubs_chart": (hubs_chart, 1),
                    "norm_bins": (norm_bins, 1), "projection_families": (projection_families, 1),
                    "projection_points": (projection_points, 2)}
        for key, (value, low) in settings.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"callbacks.diagnostics.{key}={value} must be an integer >= {low}.")
        self.every_n_epochs, self.gallery_hubs, self.gallery_random = every_n_epochs, gallery_hubs, gallery_random
        self.hubs_chart, self.norm_bins = hubs_chart, norm_bins
        self.projection_families, self.projection_points = projection_families, projection_points
        self.folder_name = folder
        self.folder: Path | None = None
        self.norms: list[torch.Tensor] = []  # this epoch's, on the device
        self.history: list[dict[str, Any]] = []  # per epoch: the norm histogram and moments
        self.timing: list[dict[str, float]] = []  # per epoch: training and diagnostics seconds
        self._epoch_started = 0.0
        self._seconds = 0.0

    # -- collecting --------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.folder = Path(trainer.default_root_dir) / self.folder_name

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started, self._seconds = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        embeddings = outputs.get("embeddings") if isinstance(outputs, dict) else None
        if embeddings is not None:
            self.norms.append(embeddings.float().norm(dim=1))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trained = time.perf_counter() - self._epoch_started - self._seconds  # the validation's pictures so far
        started = time.perf_counter()
        entry = self._norm_statistics(trainer, pl_module)
        self.norms = []
        epoch = trainer.current_epoch
        if entry is not None:
            self.history.append(entry)
            pl_module.log_dict({"embedding/norm_mean": entry["mean"], "embedding/norm_var": entry["var"]},
                               rank_zero_only=True)
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        table = self._mined_table(trainer)
        gallery_due = table is not None and ((epoch + 1) % self.every_n_epochs == 0 or last)
        term = pl_module.loss_set.prototype_term
        # A sharded classifier is gathered whole to process 0 (every process takes part).
        classifier = term.unsharded() if gallery_due and term is not None else None
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            media: dict[str, Any] = {}
            if entry is not None:
                self._write_norms(media, entry)
            if gallery_due:
                self._write_gallery(trainer, pl_module, table, epoch, media, classifier)
            log_media(trainer.loggers, media, trainer.global_step)
        self._seconds += time.perf_counter() - started
        if trainer.is_global_zero:  # a file, not the metric stream: timings would make resumed logs differ
            self.timing.append({"epoch": epoch, "train_seconds": round(trained, 3),
                                "diagnostics_seconds": round(self._seconds, 3)})
            (self.folder / "seconds.json").write_text(json.dumps(self.timing) + "\n")

    def _norm_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        """The epoch's norm histogram and moments over every process's batches (exact: counts are summed
        over one shared range)."""
        local = torch.cat(self.norms).double() if self.norms else torch.zeros(0, dtype=torch.float64,
                                                                                 device=pl_module.device)
        big = torch.finfo(torch.float64).max
        extent = torch.stack([local.min() if len(local) else local.new_tensor(big),
                              -local.max() if len(local) else local.new_tensor(big),
                              local.new_tensor(float(len(local))), local.sum()])
        if trainer.world_size > 1:
            extent = pl_module.all_gather(extent)
            low, high = float(extent[:, 0].min()), float(-extent[:, 1].min())
            count, total = float(extent[:, 2].sum()), float(extent[:, 3].sum())
        else:
            low, high, count, total = float(extent[0]), float(-extent[1]), float(extent[2]), float(extent[3])
        if count == 0:
            return None
        mean = total / count
        counts = figures.histogram(local.cpu(), self.norm_bins, low, high).to(local.device)
        spread = torch.cat([counts.double(), ((local - mean) ** 2).sum()[None]])
        if trainer.world_size > 1:
            spread = pl_module.all_gather(spread).sum(0)
        spread = spread.cpu()
        return {"epoch": trainer.current_epoch, "count": int(count), "mean": mean, "var": float(spread[-1]) / count,
                "edges": figures.histogram_edges(low, high, self.norm_bins), "counts": spread[:-1].long().tolist()}

    @staticmethod
    def _mined_table(trainer: pl.Trainer) -> Any:
        miner = next((c for c in trainer.callbacks if isinstance(c, DoppelgangerMining)), None)
        if miner is None or miner.table.filled_fraction() == 0:
            return None
        return miner.table

    # -- writing -----------------------------------------------------------------------------
    def _write_norms(self, media: dict[str, Any], entry: dict[str, Any]) -> None:
        (self.folder / "norms.json").write_text(json.dumps(self.history) + "\n")
        path = _save(figures.norms_figure(self.history), self.folder / "norms.png")
        media["embedding/norm_histogram"] = ("histogram", (entry["counts"], entry["edges"]))
        media["diagnostics/norms"] = ("image", path)

    def _gallery_classes(self, table: Any, seed: int) -> list[tuple[int, str, int]]:
        """(class, kind, how many identities have it as doppelganger): the top hubs, then a fixed sample."""
        counts = table.pointed_to()
        chosen = [(c, "hub") for c, _ in table.hubs(self.gallery_hubs)]
        generator = torch.Generator().manual_seed(stable_seed("diagnostics gallery", seed))
        sample = torch.randperm(table.num_classes, generator=generator)[:self.gallery_random].tolist()
        chosen += [(c, "sample") for c in sample if c not in {h for h, _ in chosen}]
        return [(c, kind, int(counts[c])) for c, kind in chosen]

    def gallery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, table: Any, classifier: Any = None,
                also: list[int] = ()) -> tuple[list[dict[str, Any]], dict[int, torch.Tensor]]:
        """The gallery's rows (class, name, kind, doppelgangers, the scores ``classifier`` (default: the
        loss's prototype term) gives the identity's image) and the image shown for each class in them and in
        ``also`` (read together: one pass over the training labels)."""
        classifier = classifier if classifier is not None else pl_module.loss_set.prototype_term
        datamodule = trainer.datamodule
        names = datamodule.class_names
        chosen = self._gallery_classes(table, datamodule.seed)
        rows = []
        for cls, kind, pointed_by in chosen:
            others = [int(d) for d in table.table[cls].tolist() if d >= 0]
            rows.append({"class": cls, "name": names[cls], "kind": kind, "pointed_by": pointed_by,
                         "doppelgangers": [{"class": d, "name": names[d]} for d in others]})
        wanted = sorted({r["class"] for r in rows} | {d["class"] for r in rows for d in r["doppelgangers"]}
                        | set(also))
        images = dict(zip(wanted, datamodule.class_images(wanted)))
        scores = _class_scores(pl_module, classifier, torch.stack([images[r["class"]] for r in rows]))
        for row, row_scores in zip(rows, scores if scores is not None else [None] * len(rows)):
            if row_scores is not None:
                row["own_score"] = float(row_scores[row["class"]])
                for other in row["doppelgangers"]:
                    other["score"] = float(row_scores[other["class"]])
        return rows, images

    def _write_gallery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, table: Any, epoch: int,
                       media: dict[str, Any], classifier: Any) -> None:
        hubs = table.hubs(self.hubs_chart)
        rows, images = self.gallery(trainer, pl_module, table, classifier, also=[c for c, _ in hubs])
        stem = f"e{epoch:03d}"
        (self.folder / f"gallery_{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")

        def caption(name: str, score: float | None) -> str:
            return figures.printable(name, 22) + ("" if score is None else f"\nscore {score:.3f}")

        tiles = [[(images[r["class"]], caption(r["name"], r.get("own_score")))]
                 + [(images[d["class"]], caption(d["name"], d.get("score"))) for d in r["doppelgangers"]]
                 for r in rows]
        titles = [f"{r['kind']}\n(doppelganger of {r['pointed_by']})" for r in rows]
        gallery_png = _save(figures.gallery_figure(tiles, titles), self.folder / f"gallery_{stem}.png")
        names = trainer.datamodule.class_names
        hubs_png = _save(figures.hubs_figure([names[c] for c, _ in hubs], [k for _, k in hubs], table.num_classes,
                                             [images[c] for c, _ in hubs]), self.folder / f"hubs_{stem}.png")
        media["diagnostics/gallery"] = ("image", gallery_png)
        media["diagnostics/hubs"] = ("image", hubs_png)
        table_rows = [[r["kind"], r["name"], images[r["class"]], d["name"], images[d["class"]],
                       r.get("own_score"), d.get("score")] for r in rows for d in r["doppelgangers"]]
        media["diagnostics/doppelgangers"] = ("table", (
            ["kind", "identity", "identity image", "doppelganger", "doppelganger image", "own score",
             "doppelganger score"], table_rows))

    def _on_evaluation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool) -> None:
        evaluator = getattr(pl_module, "evaluator", None)
        if not trainer.is_global_zero or evaluator is None or trainer.sanity_checking:
            return
        started = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = "final" if final else f"e{trainer.current_epoch:03d}"
        payload: dict[str, Any] = {}
        projected = self.projection(trainer, evaluator.last_split)
        if projected is not None:
            coordinates, families = projected
            title = f"evaluation embeddings, PCA ({'final' if final else f'epoch {trainer.current_epoch}'})"
            payload["diagnostics/projection"] = ("image", _save(
                figures.projection_figure(coordinates, families, title, _family_names(trainer.datamodule)),
                self.folder / f"projection_{stem}.png"))
        if not final:  # the final curves are the run's own (train.report)
            for path in evaluator.write_figures(self.folder, suffix=f"_{stem}"):
                payload[f"val/{path.stem[:-len(stem) - 1]}"] = ("image", path)
        log_media(trainer.loggers, payload, trainer.global_step)
        self._seconds += time.perf_counter() - started

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_evaluation_end(trainer, pl_module, final=False)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_evaluation_end(trainer, pl_module, final=True)

    def projection(self, trainer: pl.Trainer, split: Any) -> tuple[torch.Tensor, list[str]] | None:
        """PCA coordinates of the evaluation images of a fixed choice of families, and their families."""
        if split is None or split.labels is None or len(split.labels) < 2:
            return None
        datamodule = trainer.datamodule
        families_of = datamodule.class_groups or datamodule.class_names
        labels = split.labels.tolist()
        present = sorted({families_of[label] for label in labels})
        order = torch.randperm(len(present), generator=torch.Generator().manual_seed(
            stable_seed("diagnostics projection", datamodule.seed))).tolist()
        kept = {present[i] for i in order[:self.projection_families]}
        rows = [i for i, label in enumerate(labels) if families_of[label] in kept][:self.projection_points]
        if len(rows) < 2:
            return None
        points = split.fused(flip=False)[rows]
        return figures.pca_2d(points).float(), [families_of[labels[i]] for i in rows]

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        norms = torch.cat(self.norms).cpu() if self.norms else torch.zeros(0)
        return {"history": self.history, "norms": norms, "timing": self.timing}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.timing = list(state_dict.get("timing", []))
        norms = state_dict.get("norms")
        self.norms = [norms] if norms is not None and len(norms) else []


def _family_names(datamodule: Any) -> dict[str, str]:
    """A family's key -> the name of its first identity (emoji family keys are code points)."""
    names: dict[str, str] = {}
    for group, name in zip(datamodule.class_groups or [], datamodule.class_names):
        names.setdefault(group, name)
    return names


def _class_scores(pl_module: pl.LightningModule, term: Any, images: torch.Tensor) -> torch.Tensor | None:
    """``term``'s scores [n, classes] of ``images`` (the network in evaluation mode, then restored)."""
    if term is None:
        return None
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad():
            embeddings = pl_module.backbone(images.to(pl_module.device))
            return term.class_scores(embeddings.float()).float().cpu()
    finally:
        pl_module.train(was_training)


def _save(figure: Any, path: Path) -> Path:
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

"""Linear evaluation (the SimCLR protocol the SEC paper uses in sec. 4.4): a linear classifier trained on
frozen embeddings of the training images, its top-1 on held-out images of the same classes.

``Part.TRAIN`` embeddings, standardised with their own mean and standard deviation, train a multinomial
logistic regression (softmax layer with bias; mean cross-entropy plus ``weight_decay`` / 2 times the
squared weights, the bias not penalised), minimised by full-batch L-BFGS; ``Part.HELD_OUT`` images are
classified by it. This is scikit-learn's ``LogisticRegression(C=1 / (n * weight_decay))`` objective
(tested against it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from doppel.data.dataset import Part
from doppel.evaluation.metrics import top1_accuracy
from doppel.evaluation.protocol import DataFacts, Inputs, Protocol, Result


class LinearProbeProtocol(Protocol):
    headline = "linear_probe/top1"

    def __init__(self, iterations: int = 100, weight_decay: float = 1e-4, flip: bool = False) -> None:
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"eval.linear_probe.iterations={iterations} must be a positive integer.")
        if weight_decay < 0:
            raise ValueError(f"eval.linear_probe.weight_decay={weight_decay} must be >= 0.")
        self.iterations, self.weight_decay, self.flip = iterations, float(weight_decay), flip

    def bind(self, facts: DataFacts) -> None:
        if not facts.has(Part.HELD_OUT):
            raise ValueError("eval.linear_probe needs held-out images of the trained classes (a test set, or "
                             "data.base_queries=true).")

    def parts(self) -> set[Part]:
        return {Part.TRAIN, Part.HELD_OUT}

    def metric_names(self) -> list[str]:
        return ["linear_probe/top1"]

    def summary(self, metrics: dict[str, float]) -> list[str]:
        return [f"linear probe (softmax regression on the frozen embeddings of the training images, "
                f"{self.iterations} L-BFGS iterations): top-1 {100 * metrics['linear_probe/top1']:.2f}% on the "
                "held-out images"]

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Linear,
                                                                           torch.Tensor, torch.Tensor]:
        """(classes, the layer, the standardisation's mean and scale) fitted on ``features``."""
        classes, targets = torch.unique(labels, return_inverse=True)
        mean, scale = features.mean(0), features.std(0).clamp_min(1e-12)
        x = ((features - mean) / scale).double()
        layer = torch.nn.Linear(x.shape[1], len(classes)).double()
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
        optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=self.iterations, tolerance_grad=1e-9,
                                      tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(layer(x), targets) + self.weight_decay / 2 * layer.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(objective)
        return classes, layer, mean, scale

    def evaluate(self, inputs: Inputs) -> Result:
        split = inputs.split.of_parts(self.parts())
        embeddings = split.fused(self.flip, normalise=False).float()
        train, held_out = split.parts == Part.TRAIN, split.parts == Part.HELD_OUT
        # evaluation runs under inference mode: the probe trains outside it, on ordinary copies
        with torch.inference_mode(False), torch.enable_grad():
            classes, layer, mean, scale = self.fit(embeddings[train].clone(), split.labels[train].clone())
        with torch.no_grad():
            scores = layer(((embeddings[held_out] - mean) / scale).double())
        return Result({"linear_probe/top1": top1_accuracy(classes[scores.argmax(1)], split.labels[held_out])})

"""The pictures of :mod:`doppel.callbacks.diagnostics`, as plain functions: the numbers each picture shows
are computed here (and tested against numpy), the figures only draw them."""

from __future__ import annotations

import functools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def histogram_edges(low: float, high: float, bins: int) -> list[float]:
    """``np.histogram``'s bin edges for ``range=(low, high)``: numpy's linspace, bit for bit."""
    if high <= low:  # every value equal: numpy widens the range by 0.5 each side
        low, high = low - 0.5, high + 0.5
    edges = torch.arange(bins + 1, dtype=torch.float64) * ((high - low) / bins) + low
    edges[-1] = high
    return edges.tolist()


def histogram(values: torch.Tensor, bins: int, low: float, high: float) -> torch.Tensor:
    """Counts of ``values`` in ``bins`` equal bins over [low, high], numpy's rule: each bin holds its left
    edge, the last also its right; values outside are not counted (``np.histogram(values, bins, (low, high))``)."""
    values = values.double().flatten()
    edges = torch.tensor(histogram_edges(low, high, bins), dtype=torch.float64)
    low, high = float(edges[0]), float(edges[-1])
    values = values[(values >= low) & (values <= high)]
    index = ((values - low) * (bins / (high - low))).long().clamp(max=bins - 1)
    # float rounding can put a value one bin off: compare with the edges themselves, as numpy does
    index = index - (values < edges[index]).long()
    index = index + ((values >= edges[index + 1]) & (index != bins - 1)).long()
    return torch.bincount(index, minlength=bins)


def as_picture(image: torch.Tensor) -> np.ndarray:
    """A uint8 [C, H, W] image (C = 1 or 3) as matplotlib shows it: uint8 [H, W, 3]."""
    image = image.expand(3, -1, -1) if image.shape[0] == 1 else image
    return image.permute(1, 2, 0).contiguous().numpy()


def pca_2d(points: torch.Tensor) -> torch.Tensor:
    """The first two principal components' coordinates of ``points`` [N, D] (centred; each component's
    sign chosen so that its largest loading is positive, to keep pictures of successive epochs alike)."""
    points = points.double()
    centred = points - points.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:2]
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True))).squeeze(1)
    components = components * torch.where(signs == 0, 1.0, signs)[:, None]
    coordinates = centred @ components.T
    if coordinates.shape[1] < 2:  # one-dimensional embeddings
        coordinates = torch.cat([coordinates, torch.zeros(len(points), 2 - coordinates.shape[1])], 1)
    return coordinates


@functools.cache
def _drawable() -> frozenset[int]:
    """Code points the default font can draw (CJK names would print as boxes)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    font = font_manager.findfont(font_manager.FontProperties(family=plt.rcParams["font.family"]))
    return frozenset(FT2Font(font).get_charmap())


def printable(name: str, width: int = 28) -> str:
    """``name`` without the characters the font lacks (a character's image shows it), cut to ``width``."""
    drawable = _drawable()
    name = " ".join("".join(ch for ch in name if ord(ch) in drawable or ch.isspace()).split()) or name
    return name if len(name) <= width else name[:width - 1] + "…"


def gallery_figure(rows: list[list[tuple[torch.Tensor, str]]], row_titles: list[str]) -> Figure:
    """One tile per (image, caption), a row per identity: its own image first, then its doppelgangers."""
    columns = max(len(row) for row in rows)
    figure, grid = plt.subplots(len(rows), columns, figsize=(1.5 * columns + 1.6, 1.45 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(columns):
            axes = grid[r, c]
            axes.set_xticks([])
            axes.set_yticks([])
            if c >= len(row):
                axes.set_axis_off()
                continue
            image, caption = row[c]
            axes.imshow(as_picture(image), interpolation="nearest")
            axes.set_title(caption, fontsize=6)
            for spine in axes.spines.values():
                spine.set_color("tab:red" if c else "tab:blue")
        grid[r, 0].set_ylabel(row_titles[r], fontsize=6)
    figure.tight_layout()
    return figure


def hubs_figure(names: list[str], counts: list[int], classes: int,
                images: list[torch.Tensor] | None = None) -> Figure:
    """A bar per hub; with ``images``, each bar starts with the identity's own image (a CJK character's name is
    only its code point in a font without the glyph)."""
    row = 0.45 if images else 0.3
    figure, axes = plt.subplots(figsize=(6, row * len(names) + 1))
    positions = np.arange(len(names))[::-1]
    axes.barh(positions, counts)
    axes.set_yticks(positions, [printable(n, 40) for n in names], fontsize=7)
    if images:
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage

        for position, image in zip(positions, images):
            # zoom in points per image pixel: the picture takes 85% of its row, whatever the image size
            picture = OffsetImage(as_picture(image), zoom=row * 0.85 * 72 / image.shape[-2], interpolation="nearest")
            axes.add_artist(AnnotationBbox(picture, (0, position), xycoords=("axes fraction", "data"),
                                           box_alignment=(0, 0.5), pad=0.05, frameon=False))
        axes.set_xlim(-max(counts, default=1) * 0.12, None)  # room for the pictures left of the bars
    axes.set(xlabel=f"identities whose doppelganger it is (of {classes})", title="doppelganger hubs")
    figure.tight_layout()
    return figure


def norms_figure(history: list[dict]) -> Figure:
    """Left: the last ten epochs' norm histograms; right: the norms' mean and variance over the epochs."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    shown = history[-10:]
    colours = plt.cm.viridis(np.linspace(0, 1, len(shown)))
    for entry, colour in zip(shown, colours):
        edges = np.asarray(entry["edges"])
        counts = np.asarray(entry["counts"], dtype=float)
        density = counts / max(counts.sum(), 1) / np.diff(edges)
        left.stairs(density, edges, color=colour, label=f"epoch {entry['epoch']}")
    left.set(xlabel="||f|| (raw embedding)", ylabel="density", title="embedding norms (training batches)")
    left.legend(fontsize=6)
    epochs = [entry["epoch"] for entry in history]
    mean_line, = right.plot(epochs, [entry["mean"] for entry in history], "o-", label="mean")
    right.set(xlabel="epoch", ylabel="mean ||f||")
    twin = right.twinx()
    var_line, = twin.plot(epochs, [entry["var"] for entry in history], "s--", color="tab:orange", label="variance")
    twin.set_ylabel("variance of ||f||")
    right.set_title("norm mean and variance (SEC's target)")
    right.legend(handles=[mean_line, var_line], loc="best", fontsize=7)
    figure.tight_layout()
    return figure


def projection_figure(coordinates: torch.Tensor, families: list[str], title: str,
                      shown_as: dict[str, str] | None = None) -> Figure:
    """Points coloured by family, with a legend of the families (``shown_as`` names them there)."""
    figure, axes = plt.subplots(figsize=(6.5, 5))
    names = list(dict.fromkeys(families))
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(names), 1)))
    family_of = np.asarray([names.index(f) for f in families])
    xy = coordinates.numpy()
    for i, name in enumerate(names):
        chosen = family_of == i
        shown = (shown_as or {}).get(name, name)
        axes.scatter(xy[chosen, 0], xy[chosen, 1], s=10, color=colours[i], label=printable(shown, 24))
    axes.set(xlabel="PC 1", ylabel="PC 2", title=title)
    axes.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    return figure

"""Build the bundled emoji identity dataset from the vendors' npm tarballs.

Each emoji (skin-tone variants included) is one identity; each vendor's drawing is one image of it:
Twemoji and Noto (64 px PNGs from emoji-datasource-*), OpenMoji colour and OpenMoji outline (SVGs).
The result is one compressed ``.npz`` that Doppel reads with ``doppel.data.readers.rendered_npz.read_rendered_npz``.

Maintainers only (users get the committed file)::

    pip install -e ".[build-data]"
    python scripts/build_emoji_dataset.py --size 32 --out src/doppel/data/assets/emoji32.npz

The tarballs are fetched with ``npm pack`` unless ``--tarballs DIR`` already holds them.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np

PACKAGES = {
    "twitter": "emoji-datasource-twitter@16.0.0",
    "google": "emoji-datasource-google@16.0.0",
    "openmoji": "openmoji@17.0.0",
}
# Vendor order is the dataset's vendor index; vendor 0 gives the one-shot novel prototypes.
VENDORS = ("twitter", "google", "openmoji_color", "openmoji_outline")
SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
GENDER_SIGNS = {"2640", "2642"}
# man / woman -> person, boy / girl -> child: gendered variants share a family.
GENDERED_PEOPLE = {"1F468": "1F9D1", "1F469": "1F9D1", "1F466": "1F9D2", "1F467": "1F9D2",
                   "1F474": "1F9D3", "1F475": "1F9D3"}


def family_key(unified: str) -> str:
    """Identity family: the code points with skin tone, gender and variation selectors removed.

    Members of one family (skin tones, gender and hair variants of one emoji) are each other's
    natural doppelgangers; the train / novel split never separates them.
    """
    parts = [p for p in unified.upper().split("-") if p not in SKIN_TONES and p != "FE0F"]
    kept: list[str] = []
    for part in parts:
        if part in GENDER_SIGNS and kept and kept[-1] == "200D":
            kept.pop()
            continue
        kept.append(GENDERED_PEOPLE.get(part, part))
    while kept and kept[-1] == "200D":
        kept.pop()
    return "-".join(kept)


def npm_pack(spec: str, directory: Path) -> Path:
    name, version = spec.rsplit("@", 1)
    path = directory / f"{name}-{version}.tgz"
    if not path.exists():
        subprocess.run(["npm", "pack", spec, "--silent"], cwd=directory, check=True, stdout=subprocess.DEVNULL)
    return path


def read_members(path: Path, prefix: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name[len(prefix):]: tar.extractfile(m).read()
                for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)}


def to_rgb(png: bytes, size: int):
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGBA")
    if image.size != (64, 64):
        image = image.resize((64, 64), Image.LANCZOS)
    canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
    canvas.alpha_composite(image)
    return np.asarray(canvas.convert("RGB").resize((size, size), Image.LANCZOS), dtype=np.uint8)


def svg_to_png(svg: bytes) -> bytes:
    import cairosvg

    return cairosvg.svg2png(bytestring=svg, output_width=64, output_height=64)


def build(tarballs: Path, size: int) -> dict[str, np.ndarray]:
    twitter = npm_pack(PACKAGES["twitter"], tarballs)
    google = npm_pack(PACKAGES["google"], tarballs)
    openmoji = npm_pack(PACKAGES["openmoji"], tarballs)

    with tarfile.open(twitter) as tar:
        meta = json.load(tar.extractfile("package/emoji.json"))
    identities = []  # (unified, name, category)
    for entry in sorted(meta, key=lambda e: e["sort_order"]):
        identities.append((entry["unified"], entry["name"], entry["category"], entry["image"]))
        for variant in entry.get("skin_variations", {}).values():
            tones = "-".join(p for p in variant["unified"].split("-") if p in SKIN_TONES)
            identities.append((variant["unified"], f"{entry['name']} ({tones})", entry["category"],
                               variant["image"]))

    pngs = {
        "twitter": read_members(twitter, "package/img/twitter/64/"),
        "google": read_members(google, "package/img/google/64/"),
    }
    svgs = {
        "openmoji_color": read_members(openmoji, "package/color/svg/"),
        "openmoji_outline": read_members(openmoji, "package/black/svg/"),
    }
    svg_index = {vendor: {name[:-4].replace("-FE0F", "").upper(): name for name in files}
                 for vendor, files in svgs.items()}

    images, identity_of, vendor_of = [], [], []
    for identity, (unified, _name, category, image_name) in enumerate(identities):
        for vendor_index, vendor in enumerate(VENDORS):
            if vendor in pngs:
                png = pngs[vendor].get(image_name)
            else:
                # The outline set draws every flag as an empty rectangle: useless as an image of it.
                if vendor == "openmoji_outline" and category == "Flags":
                    continue
                svg_name = svg_index[vendor].get(unified.replace("-FE0F", "").upper())
                png = svg_to_png(svgs[vendor][svg_name]) if svg_name else None
            if png is None:
                continue
            images.append(to_rgb(png, size))
            identity_of.append(identity)
            vendor_of.append(vendor_index)

    families = sorted({family_key(u) for u, *_ in identities})
    family_index = {key: i for i, key in enumerate(families)}
    return {
        "images": np.stack(images),
        "identity": np.asarray(identity_of, dtype=np.int32),
        "vendor": np.asarray(vendor_of, dtype=np.int8),
        "identity_code": np.asarray([u for u, *_ in identities]),
        "identity_name": np.asarray([n for _, n, *_ in identities]),
        "identity_family": np.asarray([family_index[family_key(u)] for u, *_ in identities], dtype=np.int32),
        "family_key": np.asarray(families),
        "vendor_name": np.asarray(VENDORS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="side of the square RGB images in pixels")
    parser.add_argument("--tarballs", type=Path, default=Path("outputs/npm"), help="where npm tarballs live")
    parser.add_argument("--out", type=Path, default=Path("src/doppel/data/assets/emoji32.npz"))
    args = parser.parse_args()
    args.tarballs.mkdir(parents=True, exist_ok=True)
    arrays = build(args.tarballs, args.size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    counts = np.bincount(arrays["vendor"], minlength=len(VENDORS))
    print(f"{args.out}: {len(arrays['identity_code'])} identities, {len(arrays['family_key'])} families, "
          f"{len(arrays['images'])} images ({dict(zip(VENDORS, counts.tolist()))}), "
          f"{args.out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

"""Build the bundled CJK character identity dataset from the typefaces in Debian's font packages.

Each character is an identity; each typeface's rendering is one image of it (24 typefaces: Ming / Song,
Kai, Gothic, Mincho, rounded, brush and handwriting styles). Characters that differ by a stroke
(未/末, 土/士, 己/巳) are natural doppelgangers. The result has the format of the emoji set
(``doppel.data.readers.rendered_npz``), with grey images and each character's pixel-space look-alikes.

Characters: those in the first (common) level of GB 2312, Big5 and JIS X 0208 alike (the common
characters written the same way in simplified Chinese, traditional Chinese and Japanese), plus the
members of :data:`CONFUSABLE_GROUPS`, kept only where every typeface has its own glyph for them.

Rendering: each typeface is drawn at 4x and box-filtered down; per typeface one scale and offset map its
median ink box onto the same central square (the way face crops are aligned by landmarks), so
characters keep their size and position within a typeface.

Look-alikes (``lookalike``, int32 [characters, K]): the K characters nearest in pixel space, by the cosine
similarity of ink images (blurred by one pixel) averaged over the typefaces. A fixed, documented ground
truth for "does the miner pair characters that look alike" (docs/data.md).

Maintainers only (users get the committed file)::

    apt-get install $(python scripts/build_cjk_dataset.py --packages)
    pip install -e ".[build-data]"
    python scripts/build_cjk_dataset.py --out src/doppel/data/assets/cjk32.npz
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Typeface:
    name: str
    package: str  # the Debian package that installs it
    path: str
    index: int = 0  # face inside a .ttc collection


FONTS = "/usr/share/fonts"
# Order = the dataset's vendor index; typeface 0 draws the one-shot prototypes of held-out characters.
TYPEFACES = (
    Typeface("noto_sans", "fonts-noto-cjk", f"{FONTS}/opentype/noto/NotoSansCJK-Regular.ttc"),
    Typeface("noto_serif", "fonts-noto-cjk", f"{FONTS}/opentype/noto/NotoSerifCJK-Regular.ttc"),
    Typeface("ar_pl_ukai", "fonts-arphic-ukai", f"{FONTS}/truetype/arphic/ukai.ttc"),
    Typeface("ar_pl_uming", "fonts-arphic-uming", f"{FONTS}/truetype/arphic/uming.ttc"),
    Typeface("tw_kai", "fonts-cns11643-kai", f"{FONTS}/truetype/cns11643/TW-Kai-98_1.ttf"),
    Typeface("tw_sung", "fonts-cns11643-sung", f"{FONTS}/truetype/cns11643/TW-Sung-98_1.ttf"),
    Typeface("lxgw_wenkai", "fonts-lxgw-wenkai", f"{FONTS}/truetype/lxgw-wenkai/LXGWWenKai-Regular.ttf"),
    Typeface("droid_sans_fallback", "fonts-droid-fallback", f"{FONTS}/truetype/droid/DroidSansFallbackFull.ttf"),
    Typeface("ipa_gothic", "fonts-ipafont-gothic", f"{FONTS}/opentype/ipafont-gothic/ipag.ttf"),
    Typeface("ipa_mincho", "fonts-ipafont-mincho", f"{FONTS}/opentype/ipafont-mincho/ipam.ttf"),
    Typeface("hanazono_mincho", "fonts-hanazono", f"{FONTS}/truetype/hanazono/HanaMinA.ttf"),
    Typeface("ume_gothic", "fonts-horai-umefont", f"{FONTS}/truetype/horai-umefont/ume-tgo4.ttf"),
    Typeface("motoya_cedar", "fonts-motoya-l-cedar", f"{FONTS}/truetype/motoya-l-cedar/MTLc3m.ttf"),
    Typeface("motoya_maruberi", "fonts-motoya-l-maruberi", f"{FONTS}/truetype/motoya-l-maruberi/MTLmr3m.ttf"),
    Typeface("biz_ud_gothic", "fonts-morisawa-bizud-gothic", f"{FONTS}/truetype/bizud-gothic/BIZUDGothic-Regular.ttf"),
    Typeface("biz_ud_mincho", "fonts-morisawa-bizud-mincho", f"{FONTS}/truetype/bizud-mincho/BIZUDMincho-Regular.ttf"),
    Typeface("kouzan_brush", "fonts-kouzan-mouhitsu", f"{FONTS}/truetype/kouzan-mouhitsu/kouzan-mouhitsu.ttf"),
    Typeface("aoyagi_soseki", "fonts-aoyagi-soseki", f"{FONTS}/truetype/aoyagi-soseki/aoyagi-soseki.ttf"),
    Typeface("kiloji", "fonts-kiloji", f"{FONTS}/truetype/kiloji/kiloji.ttf"),
    Typeface("klee", "fonts-klee", f"{FONTS}/truetype/klee/KleeOne-Regular.ttf"),
    Typeface("seto", "fonts-seto", f"{FONTS}/truetype/seto/setofont.ttf"),
    Typeface("dejima_mincho", "fonts-dejima-mincho", f"{FONTS}/truetype/dejima-mincho/dejima-mincho-r227.ttf"),
    Typeface("oradano_mincho", "fonts-oradano-mincho-gsrr", f"{FONTS}/truetype/oradano-mincho/OradanoGSRR.ttf"),
    Typeface("mplus_1", "fonts-mplus", f"{FONTS}/opentype/mplus/Mplus1-Regular.otf"),
)
# Well-known look-alike characters, always included when every typeface draws them; they also check
# the computed look-alikes (tests/data/test_cjk.py).
CONFUSABLE_GROUPS = ("未末", "土士", "己已巳", "日曰", "人入八", "大太犬", "天夫", "王玉主", "木本", "戊戌戍戎",
                     "刀力刃", "千干于", "午牛", "白百自", "田由甲申", "今令", "矢失", "休体", "侯候", "折拆",
                     "冶治", "徒徙", "免兔", "住往", "問間", "待侍", "季李", "汗汁", "末味", "鳥烏")
RENDER_SCALE = 4
INK_EXTENT = 0.8  # the median ink box's longer side, as a share of the image side
LOOKALIKES = 5


def common_level(char: str, codec: str, first: int, last: int) -> bool:
    """Whether ``char`` is a two-byte code of ``codec`` whose lead byte is in [first, last]."""
    try:
        code = char.encode(codec)
    except UnicodeEncodeError:
        return False
    return len(code) == 2 and first <= code[0] <= last


def is_common(char: str) -> bool:
    """In the first level of GB 2312 (lead 0xB0-0xD7), Big5 (0xA4-0xC6) and JIS X 0208 (EUC 0xB0-0xCF)."""
    return (common_level(char, "gb2312", 0xB0, 0xD7) and common_level(char, "big5", 0xA4, 0xC6)
            and common_level(char, "euc_jp", 0xB0, 0xCF))


def glyph_maps(typefaces: tuple[Typeface, ...]) -> list[dict[int, str]]:
    from fontTools.ttLib import TTFont

    maps = []
    for face in typefaces:
        if not Path(face.path).is_file():
            raise SystemExit(f"{face.path} is missing: apt-get install {face.package}")
        font = TTFont(face.path, fontNumber=face.index, lazy=True)
        maps.append(dict(font.getBestCmap()))
    return maps


def choose_characters(maps: list[dict[int, str]]) -> list[str]:
    """Common and confusable characters that every typeface draws with a glyph of their own."""
    wanted = {chr(c) for c in range(0x4E00, 0xA000) if is_common(chr(c))}
    wanted |= set("".join(CONFUSABLE_GROUPS))
    # one glyph behind two wanted code points would make two identities identical in that typeface
    shared = [Counter(cmap[ord(c)] for c in wanted if ord(c) in cmap) for cmap in maps]
    return [char for char in sorted(wanted)
            if all(ord(char) in cmap and uses[cmap[ord(char)]] == 1 for cmap, uses in zip(maps, shared))]


def ink_box(font, char: str, side: int) -> tuple[int, int, int, int]:
    """The rasterised ink's box of ``char`` drawn with its pen origin at the centre of a ``side`` square
    (outline boxes of brush typefaces include empty space; the pixels do not)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).text((side / 2, side / 2), char, font=font, fill=255, anchor="ls")
    return canvas.point(lambda v: 255 if v > 64 else 0).getbbox() or (side // 2,) * 4  # an empty glyph


def render_typeface(face: Typeface, chars: list[str], size: int) -> np.ndarray:
    """uint8 [len(chars), size, size]: black ink on white, aligned by the typeface's median ink box."""
    from PIL import Image, ImageDraw, ImageFont

    big = size * RENDER_SCALE
    probe = ImageFont.truetype(face.path, big, index=face.index)
    boxes = np.array([ink_box(probe, c, 3 * big) for c in chars], dtype=np.float64)  # x0 y0 x1 y1
    extent = np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))
    centre_x = np.median((boxes[:, 0] + boxes[:, 2]) / 2) - 1.5 * big  # from the probe's pen origin
    centre_y = np.median((boxes[:, 1] + boxes[:, 3]) / 2) - 1.5 * big
    scale = INK_EXTENT * big / extent
    font = ImageFont.truetype(face.path, round(big * scale), index=face.index)
    scale = font.size / big  # the rounded size actually drawn
    origin = (big / 2 - centre_x * scale, big / 2 - centre_y * scale)
    images = np.empty((len(chars), size, size), dtype=np.uint8)
    for i, char in enumerate(chars):
        canvas = Image.new("L", (big, big), 255)
        ImageDraw.Draw(canvas).text(origin, char, font=font, fill=0, anchor="ls")
        images[i] = np.asarray(canvas.resize((size, size), Image.BOX))
    return images


def drawn(per_face: np.ndarray) -> np.ndarray:
    """bool [typefaces, C]: the typeface draws the character with at least a quarter of its median ink
    over typefaces (not an empty glyph behind a code point it claims). ``per_face``: uint8 [V, C, H, W]."""
    ink = (255.0 - per_face).sum(axis=(2, 3))
    return ink >= 0.25 * np.median(ink, axis=0)


def lookalikes(images: np.ndarray, k: int = LOOKALIKES) -> np.ndarray:
    """[C, k] nearest other characters by the cosine similarity of blurred ink, averaged over typefaces.

    ``images``: uint8 [typefaces, C, H, W]."""
    ink = 1.0 - images.astype(np.float32) / 255.0
    padded = np.pad(ink, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = ink.shape[-2:]
    blurred = sum(padded[..., dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0
    vectors = blurred.reshape(blurred.shape[0], blurred.shape[1], -1)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    similarity = np.mean([v @ v.T for v in vectors], axis=0)
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k].astype(np.int32)


def build(size: int, limit: int | None = None) -> dict[str, np.ndarray]:
    chars = choose_characters(glyph_maps(TYPEFACES))
    if limit is not None:
        chars = chars[:limit]
    per_face = np.stack([render_typeface(face, chars, size) for face in TYPEFACES])  # [V, C, H, W]
    drawn_by_face = drawn(per_face)
    keep = drawn_by_face.all(axis=0)
    for i in np.flatnonzero(~keep):
        empty = [face.name for face, drawn in zip(TYPEFACES, drawn_by_face[:, i]) if not drawn]
        print(f"dropped {chars[i]} U+{ord(chars[i]):04X}: drawn (almost) empty by {', '.join(empty)}")
    chars, per_face = [c for c, k in zip(chars, keep) if k], per_face[:, keep]
    faces, count = per_face.shape[:2]
    codes = [f"U+{ord(c):04X}" for c in chars]
    return {
        # identity-major: all typefaces of character 0, then of character 1, ...
        "images": per_face.transpose(1, 0, 2, 3).reshape(faces * count, size, size, 1),
        "identity": np.repeat(np.arange(count, dtype=np.int32), faces),
        "vendor": np.tile(np.arange(faces, dtype=np.int8), count),
        "identity_code": np.asarray(codes),
        "identity_name": np.asarray([f"{c} {code}" for c, code in zip(chars, codes)]),
        # every character is its own family: look-alikes may fall on either side of the split
        "identity_family": np.arange(count, dtype=np.int32),
        "family_key": np.asarray(codes),
        "vendor_name": np.asarray([face.name for face in TYPEFACES]),
        "lookalike": lookalikes(per_face),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="side of the square grey images in pixels")
    parser.add_argument("--limit", type=int, default=None, help="keep the first N characters (quick builds)")
    parser.add_argument("--out", type=Path, default=Path("src/doppel/data/assets/cjk32.npz"))
    parser.add_argument("--packages", action="store_true", help="print the Debian packages to install and exit")
    args = parser.parse_args()
    if args.packages:
        print(" ".join(sorted({face.package for face in TYPEFACES})))
        return
    arrays = build(args.size, args.limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"{args.out}: {len(arrays['identity_code'])} characters x {len(TYPEFACES)} typefaces = "
          f"{len(arrays['images'])} images, {args.out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

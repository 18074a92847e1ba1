"""Face alignment from five landmarks, as insightface's IJB evaluation and recognition packs align faces.

The five points (left eye, right eye, nose tip, left and right mouth corners, in image pixels) are mapped to
arcface's reference points by the least-squares similarity transform (rotation, uniform scale,
translation: Umeyama's closed form, which scikit-image's ``SimilarityTransform.estimate`` computes), and the
image is resampled through it bilinearly with black outside, as ``cv2.warpAffine`` does by default (pixel
centres at integer coordinates). The reference points are those of a 112 x 112 crop, scaled for sizes that
are multiples of 112, and scaled and shifted right by 8 x (size / 128) for multiples of 128.
"""

from __future__ import annotations

import numpy as np

ARCFACE_POINTS = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                           [41.5493, 92.3655], [70.7299, 92.2041]])


def reference_points(size: int = 112) -> np.ndarray:
    """Where the five landmarks land in a ``size`` x ``size`` aligned crop."""
    if size > 0 and size % 112 == 0:
        return ARCFACE_POINTS * (size / 112)
    if size > 0 and size % 128 == 0:
        return ARCFACE_POINTS * (size / 128) + [8 * size / 128, 0]
    raise ValueError(f"an aligned face of {size} pixels: arcface's reference points are defined for multiples of "
                     "112 or of 128 (e.g. 112, 224, 128).")


def _points(values: np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(values, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise ValueError(f"{name} must be five finite (x, y) points, shape (5, 2); got shape {points.shape}"
                         + ("" if points.shape != (5, 2) else " with non-finite values") + ".")
    return points


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2 x 3 matrix [s R | t] minimising sum ||s R p + t - q||^2 over the point pairs (p, q) (Umeyama,
    1991; a reflection is never chosen)."""
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    source_mean, target_mean = source.mean(0), target.mean(0)
    p, q = source - source_mean, target - target_mean
    u, singular, vt = np.linalg.svd(q.T @ p / len(p))
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[-1] = -1  # the best rotation, not a reflection
    rotation = u @ np.diag(signs) @ vt
    variance = (p ** 2).sum() / len(p)
    scale = (singular * signs).sum() / variance if variance > 0 else 1.0
    translation = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, translation[:, None]])


def alignment_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The 2 x 3 matrix that takes an image's pixels to the aligned ``size`` crop."""
    return similarity_transform(_points(landmarks, "the landmarks"), reference_points(size))


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """``image`` (H x W or H x W x C) resampled into ``size`` x ``size``: output pixel (x, y) is the source at
    matrix^-1 (x, y), bilinear, black where the source lies outside the image."""
    forward = np.vstack([np.asarray(matrix, dtype=np.float64), [0, 0, 1]])
    inverse = np.linalg.inv(forward)[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = sx - x0, sy - y0
    pixels = image.astype(np.float64)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    height, width = pixels.shape[:2]
    out = np.zeros((size, size, pixels.shape[2]))
    for dy, dx, weight in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy),
                           (1, 1, fx * fy)):
        x, y = x0 + dx, y0 + dy
        inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
        out += np.where(inside[..., None], pixels[y.clip(0, height - 1), x.clip(0, width - 1)], 0) * weight[..., None]
    out = out if image.ndim == 3 else out[..., 0]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8) if image.dtype == np.uint8 else out.astype(image.dtype)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The ``size`` x ``size`` crop of ``image`` (H x W x 3) with its five ``landmarks`` on arcface's points."""
    return warp_affine(image, alignment_matrix(landmarks, size), size)

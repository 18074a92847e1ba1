"""Five-point face alignment: the similarity transform against transforms made by hand and against an
independent least-squares solve, the reference points per crop size, and the warp on cases whose every
output pixel is known."""

import math

import numpy as np
import pytest

from doppel.data.align import (
    ARCFACE_POINTS,
    align_face,
    alignment_matrix,
    reference_points,
    similarity_transform,
    warp_affine,
)


def by_hand(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


@pytest.mark.parametrize("scale, angle, tx, ty", [(1, 0, 0, 0), (0.5, 0.3, -12, 40), (2.7, -2.9, 100.5, -3.25),
                                                  (0.01, math.pi, 7, 7)])
def test_an_exact_similarity_is_recovered(scale, angle, tx, ty):
    """Landmarks made by sending arcface's points back through a known transform: it is found exactly."""
    matrix = by_hand(scale, angle, tx, ty)
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    landmarks = ARCFACE_POINTS @ inverse[:, :2].T + inverse[:, 2]
    np.testing.assert_allclose(alignment_matrix(landmarks), np.linalg.inv(np.vstack([inverse, [0, 0, 1]]))[:2],
                               atol=1e-9)
    np.testing.assert_allclose(similarity_transform(landmarks, ARCFACE_POINTS), matrix, atol=1e-9)


def least_squares(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The same objective solved as a linear system in (a, b, tx, ty), x' = a x - b y + tx, y' = b x + a y + ty."""
    rows, values = [], []
    for (x, y), (u, v) in zip(source, target):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        values += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(values), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


@pytest.mark.parametrize("mirrored", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_noisy_landmarks_get_the_least_squares_similarity(seed, mirrored):
    """Mirrored landmarks (a face seen in a mirror) get the best rotation, never a reflection."""
    rng = np.random.default_rng(seed)
    landmarks = ARCFACE_POINTS * rng.uniform(0.5, 3) + rng.uniform(-50, 200, 2) + rng.normal(0, 4, (5, 2))
    landmarks[:, 0] *= -1 if mirrored else 1
    np.testing.assert_allclose(alignment_matrix(landmarks), least_squares(landmarks, ARCFACE_POINTS), atol=1e-9)


def test_reference_points_follow_the_crop_size():
    np.testing.assert_array_equal(reference_points(112), ARCFACE_POINTS)
    np.testing.assert_allclose(reference_points(224), 2 * ARCFACE_POINTS)
    np.testing.assert_allclose(reference_points(128), ARCFACE_POINTS + [8, 0])
    np.testing.assert_allclose(reference_points(256), 2 * ARCFACE_POINTS + [16, 0])
    with pytest.raises(ValueError, match="an aligned face of 100 pixels: .* multiples of 112 or of 128"):
        reference_points(100)


@pytest.mark.parametrize("landmarks, shape", [(np.zeros((4, 2)), r"\(4, 2\)"), (np.zeros(10), r"\(10,\)")])
def test_landmarks_of_another_shape_are_refused(landmarks, shape):
    with pytest.raises(ValueError, match=rf"must be five finite \(x, y\) points, shape \(5, 2\); got shape {shape}"):
        alignment_matrix(landmarks)


def picture(height: int = 140, width: int = 150) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_landmarks_already_in_place_give_the_top_left_crop():
    image = picture()
    np.testing.assert_array_equal(align_face(image, ARCFACE_POINTS), image[:112, :112])


def test_a_face_shifted_by_whole_pixels_is_shifted_back_with_black_beyond_the_image():
    image = picture(120, 115)
    out = align_face(image, ARCFACE_POINTS + [5, 3])  # the face lies 5 right and 3 down
    np.testing.assert_array_equal(out[:, :110], image[3:115, 5:115])
    assert (out[:, 110:] == 0).all()  # beyond the image's right edge


def test_a_face_twice_as_large_is_sampled_every_other_pixel():
    image = picture(230, 230)
    np.testing.assert_array_equal(align_face(image, 2 * ARCFACE_POINTS), image[0:224:2, 0:224:2])


def test_bilinear_weights_between_pixels():
    """Half a pixel to the right: each output is the rounded mean of two neighbours (hand-computed)."""
    image = np.arange(0, 240, 2, dtype=np.uint8).reshape(1, -1).repeat(4, 0)  # rows 0, 2, 4, ... 238
    out = warp_affine(image, [[1, 0, -0.5], [0, 1, 0]], 4)
    np.testing.assert_array_equal(out[0], [1, 3, 5, 7])  # (0 + 2) / 2, (2 + 4) / 2, ...
    left = warp_affine(image, [[1, 0, 0.5], [0, 1, 0]], 4)  # half a pixel to the left: black beyond the edge
    np.testing.assert_array_equal(left[0], [0, 1, 3, 5])  # (outside + 0) / 2 = 0, (0 + 2) / 2, ...

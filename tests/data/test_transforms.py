"""The paper's augmentation (sec. 4.2.3) on hand-computed cases: mirror, colour shift, grayscale."""

import numpy as np
import pytest
import torch

from doppel.data.transforms import PaperAugment, luma

RED, BLUE = (255.0, 0.0, 0.0), (0.0, 0.0, 255.0)
LUMA_RED, LUMA_BLUE = 0.299 * 255, 0.114 * 255  # ITU-R BT.601


def red_blue(n: int) -> torch.Tensor:
    """n images of 1 x 2 pixels: red on the left, blue on the right, [n, 3, 1, 2]."""
    return torch.tensor([RED, BLUE]).T.reshape(1, 3, 1, 2).repeat(n, 1, 1, 1)


def test_mirror_alone_flips_about_half_of_the_images_left_to_right():
    images = red_blue(400)
    out = PaperAugment(mirror=True, color_shift=0, grayscale_p=0, seed=1)(images)
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    kept = (out == images).flatten(1).all(1)
    assert torch.all(flipped ^ kept)  # each image is itself or its mirror, never anything else
    assert 150 < int(flipped.sum()) < 250
    assert torch.equal(PaperAugment(mirror=False, color_shift=0, grayscale_p=0)(images), images)


def test_grayscale_gives_every_channel_the_luma():
    out = PaperAugment(mirror=False, color_shift=0, grayscale_p=1.0)(red_blue(3))
    expected = torch.tensor([LUMA_RED, LUMA_BLUE]).reshape(1, 1, 1, 2).expand(3, 3, 1, 2)
    assert torch.allclose(out, expected)
    share = PaperAugment(mirror=False, color_shift=0, grayscale_p=0.25, seed=2)(red_blue(800))
    assert 150 < int((share[:, 0] == share[:, 2]).all(-1).all(-1).sum()) < 250


def test_colour_shift_is_one_offset_per_image_and_channel_within_the_range_then_clamped():
    images = torch.tensor([[[[100.0, 250.0]], [[100.0, 3.0]], [[100.0, 128.0]]]]).repeat(500, 1, 1, 1)
    out = PaperAugment(mirror=False, color_shift=10.0, grayscale_p=0)(images)
    offset = out[..., 0] - images[..., 0]  # from the unsaturated left pixel: [500, 3, 1]
    assert offset.abs().max() <= 10.0 and offset.abs().max() > 9.0 and offset.std() > 4.0
    right = (images[..., 1] + offset).clamp(0, 255)  # the same offset, clamped to 0..255
    assert torch.allclose(out[..., 1], right, atol=1e-4)
    assert (out[:, 0, 0, 1] == 255).any() and (out[:, 1, 0, 1] == 0).any()  # clamping did happen


def test_grayscale_comes_after_the_mirror_and_the_shift_as_in_the_paper():
    """Sec. 4.2.3 lists mirroring, the colour shift, then grayscale ("10% probability to lose the color"):
    a grey image is grey, with no tint left by the shift."""
    out = PaperAugment(mirror=True, color_shift=10.0, grayscale_p=1.0, seed=3)(red_blue(300))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])  # every channel the luma
    # the luma of the shifted pixels: red 255 + s_r clamps, so its luma moves by 0.587 s_g + 0.114 s_b only
    left_minus_right = out[:, 1, 0, 0] - out[:, 1, 0, 1]
    assert (left_minus_right.abs() - (LUMA_RED - LUMA_BLUE)).abs().max() < 10  # the shift moved both pixels
    assert (left_minus_right.abs() - (LUMA_RED - LUMA_BLUE)).abs().max() > 1  # (not the unshifted luma)
    # mirror first: the brighter (red) side is left or right
    assert (left_minus_right > 0).any() and (left_minus_right < 0).any()


def test_own_generator_fixed_by_the_seed_and_global_rng_untouched():
    state = torch.get_rng_state()
    a = PaperAugment(seed=4)(red_blue(16))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, PaperAugment(seed=4)(red_blue(16)))
    assert not torch.equal(a, PaperAugment(seed=5)(red_blue(16)))


@pytest.mark.parametrize("settings, key", [({"color_shift": -1.0}, "augment.color_shift"),
                                           ({"grayscale_p": 1.5}, "augment.grayscale_p")])
def test_impossible_settings_name_their_key(settings, key):
    with pytest.raises(ValueError, match=key):
        PaperAugment(**settings)


# --- SimCLR's augmentation ---

def simclr(**settings):
    from doppel.data.transforms import SimCLRAugment

    base = {"mirror": False, "crop_scale": (1.0, 1.0), "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}
    return SimCLRAugment(**{**base, **settings})


def test_simclr_with_everything_off_returns_the_images_and_mirrors_exactly():
    images = torch.randint(0, 256, (16, 3, 8, 8)).float()
    assert torch.allclose(simclr()(images), images, atol=1e-3)  # the whole image: no box of area 1 fits
    out = simclr(mirror=True)(images)
    mirrored = [torch.allclose(out[i], images[i].flip(-1), atol=1e-3) for i in range(16)]
    kept = [torch.allclose(out[i], images[i], atol=1e-3) for i in range(16)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_a_crop_samples_its_box_bilinearly():
    """On a ramp (pixel value = column), the right half scaled to 8 columns reads columns 3.75 + j / 2:
    output pixel j's centre maps into the box, and bilinear sampling of a ramp is exact (up to the last
    column, 7, where the border is repeated)."""
    from doppel.data.transforms import crop_resized

    ramp = torch.arange(8.0).expand(1, 3, 8, 8).clone()
    half = torch.tensor([0.5])
    out = crop_resized(ramp, half, torch.ones(1), half, torch.zeros(1), torch.tensor([False]))
    expected = (3.75 + torch.arange(8.0) / 2).clamp(max=7)
    assert torch.allclose(out[0, 0, 0], expected, atol=1e-5)
    mirrored = crop_resized(ramp, half, torch.ones(1), half, torch.zeros(1), torch.tensor([True]))
    assert torch.allclose(mirrored[0, 0, 0], expected.flip(0), atol=1e-5)


def test_simclr_views_of_one_batch_differ_and_stay_in_range():
    from doppel.data.transforms import SimCLRAugment

    augment = SimCLRAugment(blur_p=0.5)
    images = torch.randint(0, 256, (8, 3, 32, 32)).float()
    first, second = augment(images), augment(images)
    assert not torch.allclose(first, second) and first.min() >= 0 and first.max() <= 255


def test_color_jitter_follows_its_formulas_on_a_hand_computed_pixel():
    from doppel.data.transforms import color_jitter

    x = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    one = torch.ones(1)
    assert torch.allclose(color_jitter(x, one, one, one, torch.zeros(1)), x, atol=1e-6)
    bright = color_jitter(x, torch.tensor([1.5]), one, one, torch.zeros(1))
    assert torch.allclose(bright.flatten(), torch.tensor([0.3, 0.6, 0.9]), atol=1e-6)
    # saturation 0: every channel the pixel's luma (0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6 = 0.3630)
    gray = color_jitter(x, one, one, torch.zeros(1), torch.zeros(1))
    assert torch.allclose(gray.flatten(), torch.full((3,), 0.3630), atol=1e-4)
    # a full turn of hue is no change; half a turn negates the chroma (I, Q) and keeps the luma
    assert torch.allclose(color_jitter(x, one, one, one, one), x, atol=1e-5)
    half = color_jitter(x, one, one, one, torch.tensor([0.5]))
    assert float(luma(half)) == pytest.approx(float(luma(x)), abs=1e-5)
    assert torch.allclose(half - luma(half), -(x - luma(x)), atol=1e-5)


def test_blur_is_scipys_gaussian_filter_with_the_same_taps():
    from scipy.ndimage import correlate1d

    from doppel.data.transforms import gaussian_blur, kernel_size

    x = torch.rand(2, 3, 20, 20, dtype=torch.float64)
    sigma = torch.tensor([0.7, 1.6], dtype=torch.float64)
    size = kernel_size(40)  # 5 taps for a 40-pixel image
    assert size == 5 and kernel_size(32) == 3 and kernel_size(224) == 23
    out = gaussian_blur(x, sigma, size)
    for b in range(2):
        taps = np.exp(-np.arange(-2, 3) ** 2 / (2 * float(sigma[b]) ** 2))
        taps /= taps.sum()
        expected = correlate1d(correlate1d(x[b].numpy(), taps, axis=2, mode="mirror"), taps, axis=1, mode="mirror")
        assert np.allclose(out[b].numpy(), expected, atol=1e-12)


def test_simclr_settings_are_checked():
    from doppel.data.transforms import SimCLRAugment

    for settings, key in (({"crop_scale": (0.0, 1.0)}, "crop_scale"), ({"jitter_p": 2.0}, "jitter_p"),
                          ({"strength": 3.0}, "strength")):
        with pytest.raises(ValueError, match=f"augment.{key}"):
            SimCLRAugment(**settings)


def test_pad_crop_is_a_window_of_the_zero_padded_image_at_every_offset_in_range():
    """Each output is the image zero-padded by p on every side, cropped back to its size at one offset
    (dy, dx) in [0, 2p]^2, found here by trying them all; over many images every offset occurs."""
    p, n = 2, 600
    images = torch.arange(1, 3 * 5 * 6 + 1, dtype=torch.float32).reshape(1, 3, 5, 6).repeat(n, 1, 1, 1)
    out = PaperAugment(mirror=False, color_shift=0, grayscale_p=0, pad_crop=p, seed=3)(images)
    padded = np.zeros((3, 5 + 2 * p, 6 + 2 * p), dtype=np.float32)
    padded[:, p:p + 5, p:p + 6] = images[0].numpy()
    seen = set()
    for crop in out.numpy():
        matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                   if np.array_equal(crop, padded[:, dy:dy + 5, dx:dx + 6])]
        assert len(matches) == 1, matches
        seen.add(matches[0])
    assert seen == {(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)}


def test_pad_crop_off_draws_nothing_so_the_stream_is_the_papers_three_draws():
    """With pad_crop=0 the generator gives exactly the mirror, shift and grayscale draws, in that order (as
    before pad_crop existed, commit 419e3f5): the batch recomputed here from those draws by hand."""
    images = red_blue(50) + torch.arange(50.0)[:, None, None, None]
    out = PaperAugment(mirror=True, color_shift=10.0, grayscale_p=0.1, pad_crop=0, seed=4)(images)
    generator = torch.Generator().manual_seed(4)
    flip = torch.rand(50, generator=generator) < 0.5
    shift = (torch.rand(50, 3, generator=generator) * 2 - 1) * 10.0
    gray = torch.rand(50, generator=generator) < 0.1
    assert 0 < int(gray.sum()) < 50
    for i in range(50):
        image = images[i].flip(-1) if flip[i] else images[i]
        image = (image + shift[i][:, None, None]).clamp(0, 255)
        if gray[i]:
            image = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).expand(3, -1, -1)
        assert torch.allclose(out[i], image, atol=1e-4), i
    with pytest.raises(ValueError, match="augment.pad_crop=-1"):
        PaperAugment(pad_crop=-1)

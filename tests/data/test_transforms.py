"""The paper's augmentation (sec. 4.2.3) on hand-computed cases: mirror, colour shift, grayscale."""

import pytest
import torch

from doppel.data.transforms import PaperAugment

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


def test_grayscale_comes_before_the_shift_and_after_the_mirror():
    out = PaperAugment(mirror=True, color_shift=10.0, grayscale_p=1.0, seed=3)(red_blue(300))
    # gray first: both pixels of a channel carry that channel's offset, so channel differences are equal
    between_channels = out[:, 0] - out[:, 2]
    assert torch.allclose(between_channels[..., 0], between_channels[..., 1], atol=1e-4)
    assert between_channels.abs().max() > 5  # and the channels do differ: the shift came after
    # mirror first: the brighter (red) side is left or right
    left_minus_right = out[:, 1, 0, 0] - out[:, 1, 0, 1]
    assert torch.allclose(left_minus_right.abs(), torch.tensor(LUMA_RED - LUMA_BLUE), atol=1e-3)
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

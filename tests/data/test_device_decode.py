"""data.decode=gpu: workers read bytes, the batch is decoded where it trains. On the CPU its twin runs the
same code with torchvision's decoder on the CPU, and must give the tensors of data.decode=cpu (Pillow in the
workers) up to the decoders' rounding."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from doppel.data.datamodule import IdentityDataModule
from doppel.data.dataset import CorruptImage
from doppel.data.device_decode import EncodedBatch
from doppel.sampling.doppelganger import DoppelgangerTable
from tests.data.formats import encode, identities, varied, write_folder

SAMPLER = OmegaConf.create({"_target_": "doppel.sampling.samplers.IdentityBatchSampler", "batch_size": 8,
                            "examples_per_class": 2})
FOLDER = "doppel.data.readers.folder.read_folder"
TOLERANCE = 3  # nvJPEG against libjpeg-turbo, levels of 255 on a pixel (IDCT, chroma upsampling)


def first_batches(root, decode, monkeypatch, batches=3, **settings):
    if decode == "gpu":  # the twin: the GPU path's code, on the CPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    module = IdentityDataModule(reader=FOLDER, root=str(root), decode=decode, pin_memory=False, **settings)
    monkeypatch.undo()
    module.setup()
    module.attach_sampler(SAMPLER, DoppelgangerTable(module.num_classes), 0)
    loader = iter(module.train_dataloader())
    return [module.on_after_batch_transfer(next(loader), 0) for _ in range(batches)]


@pytest.mark.parametrize("settings", [{}, {"resize": 20, "crop": 16}], ids=["as_stored", "resized_random_crop"])
def test_decoding_on_the_device_gives_the_workers_tensors_up_to_decoder_rounding(tmp_path, monkeypatch, settings):
    classes = identities(n_classes=30, per_class=4, size=24)
    if settings:
        classes = [[varied(image, i) for i, image in enumerate(images)] for images in classes]
    root = write_folder(tmp_path / "faces", classes, kind="jpg")
    # one PNG among the JPEGs: nvJPEG reads JPEG only, so its worker decodes it
    (root / "id000" / "00.jpg").unlink()
    (root / "id000" / "00.png").write_bytes(encode(classes[0][0], "png"))
    workers = first_batches(root, "cpu", monkeypatch, **settings)
    device = first_batches(root, "gpu", monkeypatch, **settings)
    for (images, labels), (decoded, same_labels) in zip(workers, device):
        # torchvision's CPU decoder and Pillow are both libjpeg-turbo: the same bytes, crops and labels
        assert torch.equal(labels, same_labels) and torch.equal(decoded, images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="data.decode=gpu needs CUDA (nvJPEG)")
def test_nvjpeg_gives_the_workers_tensors_up_to_decoder_rounding(tmp_path, monkeypatch):
    classes = [[varied(image, i) for i, image in enumerate(images)] for images in identities(30, 4, 24)]
    root = write_folder(tmp_path / "faces", classes, kind="jpg")
    workers = first_batches(root, "cpu", monkeypatch, resize=20, crop=16)
    module = IdentityDataModule(reader=FOLDER, root=str(root), decode="gpu", pin_memory=False, resize=20, crop=16)
    module.setup()
    module.attach_sampler(SAMPLER, DoppelgangerTable(module.num_classes), 0)
    loader = iter(module.train_dataloader())
    for images, labels in workers:
        encoded, same_labels = next(loader)
        decoded, _ = module.on_after_batch_transfer((encoded, same_labels.cuda()), 0)
        assert decoded.is_cuda and torch.equal(labels, same_labels)
        difference = (decoded.cpu().int() - images.int()).abs()
        assert difference.max() <= TOLERANCE and difference.float().mean() < 0.5


def test_the_workers_hand_over_bytes_and_a_corrupt_jpeg_is_named(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "faces", identities(n_classes=30, per_class=4, size=16), kind="jpg")
    batch, labels = _raw_batch(root, monkeypatch)
    assert isinstance(batch, EncodedBatch) and len(batch) == len(labels) == 8
    assert all(item.dim() == 1 and bytes(item[:3].tolist()) == b"\xff\xd8\xff" for item in batch.items)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    module = IdentityDataModule(reader=FOLDER, root=str(root), decode="gpu", pin_memory=False)
    monkeypatch.undo()
    module.setup()
    bad = Path(module.data.images.name(int(module.split.index[module.split.training[5]])))
    for image in bad.parent.iterdir():  # a class's images, so a batch draws one
        image.write_bytes(image.read_bytes()[:40])  # truncated inside the headers: the worker does not notice
    module.attach_sampler(SAMPLER, DoppelgangerTable(module.num_classes), 0)
    with pytest.raises(CorruptImage, match=rf"{bad.parent.name}/0[0-3].jpg is not a readable JPEG"):
        for batch in module.train_dataloader():
            module.on_after_batch_transfer(batch, 0)


def _raw_batch(root, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    module = IdentityDataModule(reader=FOLDER, root=str(root), decode="gpu", pin_memory=False)
    monkeypatch.undo()
    module.setup()
    module.attach_sampler(SAMPLER, DoppelgangerTable(module.num_classes), 0)
    return next(iter(module.train_dataloader()))


def test_gpu_decoding_settings_are_checked(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "faces", identities(n_classes=4, per_class=4, size=16), kind="jpg")
    with pytest.raises(ValueError, match="data.decode='nvjpeg' is not one of"):
        IdentityDataModule(reader=FOLDER, root=str(root), decode="nvjpeg")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="data.decode=gpu decodes JPEGs with nvJPEG on a CUDA device and none"):
            IdentityDataModule(reader=FOLDER, root=str(root), decode="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="data.skip_corrupt=true replaces unreadable images in the workers"):
        IdentityDataModule(reader=FOLDER, root=str(root), decode="gpu", skip_corrupt=True)
    from tests.conftest import write_emoji_npz
    pixels = IdentityDataModule(reader="doppel.data.readers.rendered_npz.read_rendered_npz",
                                path=str(write_emoji_npz(tmp_path / "e.npz")), decode="gpu", pin_memory=False)
    pixels.attach_sampler(SAMPLER, DoppelgangerTable(2), 0)
    with pytest.raises(ValueError, match="this data holds decoded pixels: use data.decode=cpu"):
        pixels.train_dataloader()

"""Each reader on files the test writes in the format's exact layout: labels, bytes, roles, errors."""

import os
import warnings

import pytest
import torch

from doppel.data.datamodule import IdentityDataModule, collate
from doppel.data.dataset import DataError, Part
from doppel.data.readers.cifar_mnist import read_cifar, read_mnist
from doppel.data.readers.csv_manifest import read_csv
from doppel.data.readers.dml_benchmarks import read_cars, read_cub, read_inshop, read_sop
from doppel.data.readers.folder import read_folder
from doppel.data.split import split_dataset
from doppel.data.transforms import ImageTransform
from tests.data.formats import (
    identities,
    write_cars,
    write_cifar,
    write_cub,
    write_folder,
    write_inshop,
    write_mnist,
    write_mslowshot,
    write_sop,
)


def test_folder_classes_in_name_order_with_lossless_pixels(tmp_path):
    classes = identities(3, 2)
    root = write_folder(tmp_path, classes, "png")
    (root / "id000" / "notes.txt").write_text("not an image")
    (root / "id000" / ".hidden.png").write_bytes(b"x")
    data = read_folder(str(root))
    assert data.class_names == ["id000", "id001", "id002"] and data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(torch.equal(data.images[2 * c + i], classes[c][i]) for c in range(3) for i in range(2))
    (tmp_path / "classes.txt").write_text("id002\nid000\n")
    listed = read_folder(str(root), class_list=str(tmp_path / "classes.txt"))
    assert listed.class_names == ["id002", "id000"] and torch.equal(listed.images[0], classes[2][0])


def test_folder_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root='.*nope' does not exist"):
        read_folder(str(tmp_path / "nope"))
    root = write_folder(tmp_path / "f", identities(2, 1), "png")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no images .*remove the empty class folder"):
        read_folder(str(root))


def test_a_class_folder_listed_twice_is_refused_not_made_two_classes(tmp_path):
    root = write_folder(tmp_path / "f", identities(3, 2), "png")
    (tmp_path / "classes.txt").write_text("id000\nid001\n\nid000/\n")  # the same folder, spelt with a slash
    with pytest.raises(DataError, match=r"classes.txt, line 4: 'id000/' is listed again \(first on line 1\); list "
                                        "each class folder once"):
        read_folder(str(root), class_list=str(tmp_path / "classes.txt"))


def test_csv_split_and_role_columns_give_roles(tmp_path):
    write_folder(tmp_path / "faces", identities(3, 2), "png")
    (tmp_path / "list.tsv").write_text("path\tlabel\tsplit\trole\n" "faces/id000/00.png\tann\ttrain\t\n"
                                       "faces/id000/01.png\tann\ttrain\tquery\n" "faces/id001/00.png\tbo\ttrain\t\n"
                                       "faces/id002/00.png\tcy\ttest\tgallery\n" "faces/id002/01.png\tcy\ttest\t\n")
    data = read_csv(str(tmp_path / "list.tsv"))
    assert data.class_names == ["ann", "bo", "cy"] and data.labels.tolist() == [0, 0, 1, 2, 2]
    assert data.parts.tolist() == [Part.TRAIN, Part.HELD_OUT, Part.TRAIN, Part.REFERENCE, Part.TEST_CLASS]
    assert data.images.fetch(4) == (tmp_path / "faces" / "id002" / "01.png").read_bytes()
    split = split_dataset(data)
    assert split.num_classes == 2 and split.part.tolist() == [0, 1, 0, 2, 3]


def test_csv_errors_name_file_line_and_column(tmp_path):
    (tmp_path / "a.csv").write_text("file,label\nx.png,1\n")
    with pytest.raises(DataError, match="a.csv: the first line .* has no 'path' column"):
        read_csv(str(tmp_path / "a.csv"))
    (tmp_path / "b.csv").write_text("path,label,split\nx.png,1,train\ny.png,2,validation\n")
    with pytest.raises(DataError, match="b.csv, line 3: split='validation'"):
        read_csv(str(tmp_path / "b.csv"))
    (tmp_path / "c.csv").write_text("path,label\nx.png\n")
    with pytest.raises(DataError, match="c.csv, line 2: 1 fields for the 2 columns"):
        read_csv(str(tmp_path / "c.csv"))
    with pytest.raises(FileNotFoundError, match="data.path is not set"):
        read_csv(None)


def test_numeric_csv_labels_sort_as_numbers(tmp_path):
    (tmp_path / "l.csv").write_text("path,label\na.png,10\nb.png,9\nc.png,10\n")
    assert read_csv(str(tmp_path / "l.csv")).class_names == ["9", "10"]
    # digits that str.isdigit accepts and int() does not: names, sorted as text
    (tmp_path / "s.csv").write_text("path,label\na.png,\u00b2\nb.png,3\nc.png,-1\n", encoding="utf-8")
    assert read_csv(str(tmp_path / "s.csv")).class_names == ["-1", "3", "\u00b2"]


def test_a_csv_role_column_needs_a_split_column(tmp_path):
    """Without a split column the split is by hash (data.novel_fraction); a role column alone would turn
    that off silently, so it is refused."""
    (tmp_path / "r.csv").write_text("path,label,role\na.png,ann,\nb.png,ann,query\nc.png,bo,\n")
    with pytest.raises(DataError, match="r.csv: a role column without a split column; .*add a split column, or "
                                        r"drop the role column to split by hash \(data.novel_fraction\)"):
        read_csv(str(tmp_path / "r.csv"))
    (tmp_path / "p.csv").write_text("path,label\na.png,ann\nb.png,ann\nc.png,bo\n")
    assert read_csv(str(tmp_path / "p.csv")).parts is None  # split by hash


def test_cub_cars_sop_train_on_the_first_classes_and_hold_out_the_rest(tmp_path):
    cub = read_cub(str(write_cub(tmp_path / "cub", identities(104, 2))))
    assert len(cub.class_names) == 104 and cub.class_names[0] == "001.Bird_0" and cub.class_names[100] == "101.Bird_100"
    assert (cub.parts[cub.labels < 100] == Part.TRAIN).all() and (cub.parts[cub.labels >= 100] == Part.TEST_CLASS).all()
    assert cub.images.fetch(0) == (tmp_path / "cub" / "images" / "001.Bird_0" / "bird_0.jpg").read_bytes()
    split = split_dataset(cub)
    assert split.num_classes == 100 and int((split.part == Part.REFERENCE).sum()) == 4

    cars = read_cars(str(write_cars(tmp_path / "cars", identities(100, 2))))
    assert cars.class_names[97] == "Car 98" and cars.class_names[98] == "Car 99"
    assert (cars.parts[cars.labels < 98] == Part.TRAIN).all()
    assert (cars.parts[cars.labels >= 98] == Part.TEST_CLASS).all()
    assert cars.images.fetch(3) == (tmp_path / "cars" / "car_ims" / "000004.jpg").read_bytes()

    sop = read_sop(str(write_sop(tmp_path / "sop", identities(6, 2), train_classes=4)))
    assert sop.class_names == ["1", "2", "3", "4", "5", "6"] and sop.groups == ["1", "2", "3", "1", "2", "3"]
    assert sop.parts.tolist() == [Part.TRAIN] * 8 + [Part.TEST_CLASS] * 4


def test_inshop_queries_and_gallery_keep_their_roles(tmp_path):
    data = read_inshop(str(write_inshop(tmp_path, identities(4, 4), train_classes=2)))
    split = split_dataset(data)
    assert split.num_classes == 2
    novel = split.part[split.label >= 2].tolist()
    assert novel == [Part.REFERENCE, Part.QUERY] * 4  # gallery, query, gallery, query per item
    (tmp_path / "list_eval_partition.txt").write_text("1\nimage_name item_id evaluation_status\na.jpg id_1 val\n")
    with pytest.raises(DataError, match="line 3: status 'val' is not train, query or gallery"):
        read_inshop(str(tmp_path))


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_batches_give_the_pixels_planes_and_test_images_as_base_queries(tmp_path, hundred):
    classes = identities(8, 4, size=32)
    data = read_cifar(str(write_cifar(tmp_path / "c", classes, hundred)), classes=100 if hundred else 10)
    pairs = [(c, image) for c, pictures in enumerate(classes) for image in pictures]
    train = [p for i, p in enumerate(pairs) if i % 4]
    first = train[0::5][0] if not hundred else train[0]  # data_batch_1 holds train[0::5]
    assert data.labels[0] == first[0] and torch.equal(data.images[0], first[1])
    assert (data.parts[-8:] == Part.HELD_OUT).all() and (data.parts[:-8] == Part.TRAIN).all()
    assert data.class_names[3] == "class3"
    if hundred:
        assert data.groups == ["a", "b", "c", "d"] * 2


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files(tmp_path, gz):
    classes = identities(10, 4, size=28)
    data = read_mnist(str(write_mnist(tmp_path / "m", classes, gz)))
    assert data.labels[:3].tolist() == [0, 0, 0] and torch.equal(data.images[0], classes[0][1][0].expand(3, -1, -1))
    assert int((data.parts == Part.HELD_OUT).sum()) == 10
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    if not gz:
        (tmp_path / "m" / name).write_bytes((tmp_path / "m" / name).read_bytes()[:-5])
        with pytest.raises(DataError, match="the file is truncated"):
            read_mnist(str(tmp_path / "m"))


def test_corrupt_images_are_an_error_naming_the_file_or_skipped_when_asked(tmp_path):
    root = write_folder(tmp_path / "faces", identities(3, 3), "jpg")
    broken = root / "id001" / "01.jpg"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    common = {"reader": "doppel.data.readers.folder.read_folder", "root": str(root), "novel_fraction": 0.0}
    module = IdentityDataModule(**common)
    module.setup()
    dataset = module._dataset(torch.arange(9), train=False)
    with pytest.raises(DataError, match=f"{broken} is not a readable image .*data.skip_corrupt=true"):
        [dataset[i] for i in range(9)]
    module = IdentityDataModule(**common, skip_corrupt=True)
    module.setup()
    position = module.split.index.tolist().index(4)  # id001/01.jpg is image 4 of the folder
    # training: replaced by the next training image of its class
    dataset = module._dataset(module.split.training, train=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = [dataset[(i, 0)][0] for i in range(len(dataset))]
    assert len(caught) == 1 and str(broken) in str(caught[0].message) and dataset.skipped == 1
    training = module.split.training.tolist()
    at = training.index(position)
    same = [i for i, p in enumerate(training) if module.split.label[p] == module.split.label[position]]
    following = same[(same.index(at) + 1) % len(same)]
    assert following != at and torch.equal(images[at], images[following])
    # evaluation: left out (a negative item index), never replaced
    dataset = module._dataset(torch.arange(9), train=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dataset[i][1] for i in range(9)]
    assert items == [-1 - i if i == position else i for i in range(9)]
    assert len(caught) == 1 and "left out of the evaluation, not replaced" in str(caught[0].message)


def test_crops_are_fixed_by_the_image_seed_and_centre_crops_by_nothing():
    image = torch.arange(3 * 40 * 30, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 40, 30)
    transform = ImageTransform(resize=24, crop=16)
    resized = transform(image.clone(), None)
    assert resized.shape == (3, 16, 16)
    big = ImageTransform(resize=24)(image)
    assert big.shape == (3, 32, 24) and torch.equal(resized, big[:, 8:24, 4:20])  # the centre of 32 x 24
    a, b, c = transform(image, 5), transform(image, 5), transform(image, 6)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (3, 16, 16)
    with pytest.raises(DataError, match="different sizes .*set data.resize and data.crop"):
        collate([(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.tensor(0)),
                 (torch.zeros(3, 5, 4, dtype=torch.uint8), torch.tensor(1))])


def test_an_unknown_reader_setting_is_named_with_a_hint():
    with pytest.raises(ValueError, match="data.rot is not a setting \\(did you mean root\\?\\)"):
        IdentityDataModule(reader="doppel.data.readers.folder.read_folder", rot="/x")


def test_mslowshot_tsv_roles_from_base_lowshot_and_dev_files(tmp_path):
    import base64

    from doppel.data.readers.mslowshot_tsv import read_mslowshot

    classes = identities(6, 3)
    root = write_mslowshot(tmp_path / "ms", classes, n_base=4)
    data = read_mslowshot(str(root), dev="DevSet.tsv")
    assert data.class_names == [f"m.0{c:04x}" for c in range(6)]
    base_rows = [(c, i) for c in range(4) for i in range(2)]
    assert data.labels[:8].tolist() == [c for c, _ in base_rows] and (data.parts[:8] == Part.TRAIN).all()
    assert data.labels[8:10].tolist() == [4, 5] and (data.parts[8:10] == Part.REFERENCE).all()
    dev_roles = data.parts[10:].tolist()
    assert dev_roles == [Part.HELD_OUT] * 4 + [Part.QUERY] * 4
    line = (root / "TrainData_Base.tsv").read_bytes().decode().split("\r\n")[2]
    assert data.images.fetch(2) == base64.b64decode(line.split("\t")[1])
    assert (root / "TrainData_Base.tsv.doppel-index.npz").is_file()  # the second read uses the index
    assert torch.equal(read_mslowshot(str(root), dev="DevSet.tsv").labels, data.labels)
    (root / "DevSet.tsv").write_text("x\ty\tm.00000\t1\tu\tNovel\n")
    with pytest.raises(DataError, match="MID m.00000 is flagged 'novel' but is a base identity"):
        read_mslowshot(str(root), dev="DevSet.tsv")


def test_doppel_data_is_the_default_root(tmp_path, monkeypatch):
    write_folder(tmp_path / "images", identities(2, 2), "png")
    monkeypatch.delenv("DOPPEL_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="data.root is not set: .* \\(or set DOPPEL_DATA to the folder that "
                                                "holds images\\)"):
        read_folder(None)
    monkeypatch.setenv("DOPPEL_DATA", str(tmp_path))
    assert read_folder(None).class_names == ["id000", "id001"]


def test_lazy_images_pickle_into_spawned_workers(tmp_path):
    """Workers started by spawn (macOS, Windows) receive the dataset pickled: no lambdas, no open files."""
    import pickle

    from doppel.data.readers.mslowshot_tsv import read_mslowshot
    from doppel.data.readers.recordio import read_recordio, write_recordio
    from doppel.data.readers.verification_bin import read_verification_bin, write_verification_bin
    from tests.data.formats import encode

    classes = identities(3, 2)
    folder = read_folder(str(write_folder(tmp_path / "f", classes, "png")))
    write_recordio(tmp_path / "train.rec", enumerate([encode(i, "jpg") for i in images] for images in classes))
    record = read_recordio(str(tmp_path / "train.rec"))
    record.images.fetch(0)  # the pack is open in this process now
    tsv = read_mslowshot(str(write_mslowshot(tmp_path / "ms", identities(4, 2), n_base=3)), dev="DevSet.tsv")
    tsv.images.fetch(0)
    write_verification_bin(tmp_path / "p.bin", [encode(classes[0][0])] * 2, [True])
    pairs = read_verification_bin(tmp_path / "p.bin")
    for images in (folder.images, record.images, tsv.images, pairs.images):
        copy = pickle.loads(pickle.dumps(images))
        assert copy.fetch(1) == images.fetch(1) and torch.equal(copy[1], images[1])


def test_a_split_that_trains_on_a_test_class_is_refused(tmp_path):
    write_folder(tmp_path / "faces", identities(3, 2), "png")
    rows = ["faces/id000/00.png,ann,train", "faces/id001/00.png,bo,train", "faces/id000/01.png,ann,test"]
    (tmp_path / "l.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match="image 2 is a held-out \\(test\\) image of class 'ann', which is also "
                                        "trained on"):
        split_dataset(read_csv(str(tmp_path / "l.csv")))
    rows[2] = "faces/id002/01.png,cy,train,query"
    (tmp_path / "q.csv").write_text("path,label,split,role\n" + "\n".join(r + ("" if r.count(",") == 3 else ",")
                                                                         for r in rows) + "\n")
    with pytest.raises(DataError, match="image 2 is a base query of class 'cy', which has no training images"):
        split_dataset(read_csv(str(tmp_path / "q.csv")))


def test_csv_repeated_paths_and_encodings(tmp_path):
    """A repeated line would be trained and tested on at once: an error naming both lines (or dropped and
    counted with drop_duplicates); one path under two labels is always an error. Excel's UTF-8 byte order
    mark is read; Latin-1 text is named."""
    (tmp_path / "twice.csv").write_text("path,label\na.png,ann\nb.png,ann\nc.png,bo\n./a.png,ann\n")
    with pytest.raises(DataError, match=r"twice.csv, line 5: ./a.png is listed again \(first on line 2\).*"
                                        "data.drop_duplicates=true"):
        read_csv(str(tmp_path / "twice.csv"))
    with pytest.warns(UserWarning, match="dropped 1 repeated lines"):
        data = read_csv(str(tmp_path / "twice.csv"), drop_duplicates=True)
    assert data.labels.tolist() == [0, 0, 1]
    (tmp_path / "two_labels.csv").write_text("path,label\na.png,ann\nb.png,bo\na.png,bo\n")
    for drop in (False, True):
        with pytest.raises(DataError, match=r"two_labels.csv, line 4: a.png is labelled 'bo' here and 'ann' on line 2"):
            read_csv(str(tmp_path / "two_labels.csv"), drop_duplicates=drop)
    (tmp_path / "excel.csv").write_bytes("\ufeffpath,label\na.png,Zoë\n".encode())
    assert read_csv(str(tmp_path / "excel.csv")).class_names == ["Zoë"]
    (tmp_path / "latin1.csv").write_bytes("path,label\na.png,Zoë\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv is not UTF-8 text \(byte 0xeb at offset 19\): save it as UTF-8"):
        read_csv(str(tmp_path / "latin1.csv"))


def test_a_training_batch_of_constant_images_is_warned_about():
    from doppel.data.datamodule import collate_training

    black = [(torch.zeros(3, 4, 4, dtype=torch.uint8), 0), (torch.zeros(3, 4, 4, dtype=torch.uint8), 1)]
    with pytest.warns(UserWarning, match="a training batch holds only constant images"):
        collate_training(black)
    varied = [(torch.arange(48, dtype=torch.uint8).view(3, 4, 4), 0), *black[1:]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collate_training(varied)


def test_a_class_folder_not_named_in_utf8_is_named_by_its_bytes(tmp_path):
    root = write_folder(tmp_path / "f", identities(2, 2), "png")
    os.rename(root / "id001", os.path.join(os.fsencode(root), "Jos\xe9".encode("latin-1")))
    with pytest.raises(DataError, match=r"the class folder b'Jos\\xe9' is not named in UTF-8 .*rename it in UTF-8"):
        read_folder(str(root))


def test_a_class_with_no_readable_training_image_is_named_by_name_under_skip_corrupt(tmp_path):
    root = write_folder(tmp_path / "faces", identities(3, 3), "jpg")
    for image in (root / "id002").iterdir():
        image.write_bytes(image.read_bytes()[:40])
    module = IdentityDataModule(reader="doppel.data.readers.folder.read_folder", root=str(root), novel_fraction=0.0,
                                skip_corrupt=True)
    module.setup()
    dataset = module._dataset(module.split.training, train=True)
    first = next(i for i, p in enumerate(module.split.training.tolist()) if module.split.names[
        int(module.split.label[p])] == "id002")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"data.skip_corrupt: every training image of class 'id002' is unreadable "
                                            r"\(one is .*id002/0\d.jpg\): replace its images or remove the class"):
            dataset[(first, 0)]

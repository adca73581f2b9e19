import gzip
import os

import numpy as np
import pytest
from PIL import Image

from fpet.errors import FpetError
from fpet.imaging import to_rgb
from tests.helpers.images import png_bomb
from tests.helpers.tiny import make_image_folder
from training.data import (
    FASHION_MNIST_CLASSES,
    Preprocessing,
    open_split,
    parse_label_group,
    regroup,
    split_train_val,
)

PRE = Preprocessing(img_size=16)


def test_image_folder_decodes_resized_rgb(tmp_path):
    source = open_split(make_image_folder(tmp_path, per_class=4), "train")
    assert source.classes == ["class_0", "class_1", "class_2"] and len(source) == 12
    data = source.decode(range(12), PRE)
    assert data.pixels.shape == (12, 3, 16, 16) and data.pixels.dtype.is_floating_point is False
    assert data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert open_split(tmp_path, "test") is None


def test_train_and_test_subfolders(tmp_path):
    make_image_folder(tmp_path / "train", per_class=3)
    make_image_folder(tmp_path / "test", per_class=2)
    assert len(open_split(tmp_path, "train")) == 9
    assert len(open_split(tmp_path, "test", classes=["class_0", "class_1", "class_2"])) == 6
    with pytest.raises(FpetError, match="has classes"):
        open_split(tmp_path, "test", classes=["a", "b", "c"])


def test_vtab_lists(tmp_path):
    make_image_folder(tmp_path / "images", per_class=2)
    lines = [f"images/class_{c}/{i:03d}.png {c}" for c in range(3) for i in range(2)]
    (tmp_path / "train800val200.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(lines[:3]) + "\n")
    train = open_split(tmp_path, "train")
    assert train.labels == [0, 0, 1, 1, 2, 2] and train.classes == ["0", "1", "2"]
    assert len(open_split(tmp_path, "test", classes=train.classes)) == 3
    (tmp_path / "test.txt").write_text("images/class_0/000.png 7\n")
    with pytest.raises(FpetError, match=r"label 7 is out of range 0\.\.2"):
        open_split(tmp_path, "test", classes=train.classes)
    (tmp_path / "test.txt").write_text("no-label-here\n")
    with pytest.raises(FpetError, match="expected 'relative/path label'"):
        open_split(tmp_path, "test", classes=train.classes)
    (tmp_path / "train800val200.txt").write_text("\n".join([*lines, "images/class_0/000.png 99999999"]) + "\n")
    with pytest.raises(FpetError, match="label 99999999 is larger than the 7 images listed allow"):
        open_split(tmp_path, "train")  # not a list of 10^8 classes built in memory
    (tmp_path / "train800val200.txt").unlink()
    with pytest.raises(FpetError, match=r"has no train800val200\.txt: not a VTAB folder"):
        open_split(tmp_path, "train", fmt="vtab")


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_idx_files_any_folder(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.arange(5 * 28 * 28).reshape(5, 28, 28) % 255)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 9]))
    source = open_split(tmp_path, "train")
    assert source.labels == [0, 1, 2, 3, 9] and source.classes == FASHION_MNIST_CLASSES
    data = source.decode([0, 4], PRE)
    assert data.pixels.shape == (2, 3, 16, 16)
    assert (data.pixels[:, 0] == data.pixels[:, 1]).all()  # grey made RGB
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + (9).to_bytes(4, "big")))
    with pytest.raises(FpetError):
        open_split(tmp_path, "train")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(np.arange(4000).tobytes())[:100])  # cut short
    with pytest.raises(FpetError, match="is damaged"):
        open_split(tmp_path, "train")


FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package():
    train, test = open_split(FMNIST, "train"), open_split(FMNIST, "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert sorted(set(test.labels)) == list(range(10))
    data = test.decode(range(4), Preprocessing(img_size=28))
    assert data.pixels.shape == (4, 3, 28, 28) and data.pixels.max() > 100


def test_bad_folders(tmp_path):
    with pytest.raises(FpetError, match="does not exist"):
        open_split(tmp_path / "nope", "train")
    with pytest.raises(FpetError, match="is empty"):
        open_split(tmp_path, "train")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    (tmp_path / "b").mkdir()
    with pytest.raises(FpetError, match=r"class folder .*b has no images"):
        open_split(tmp_path, "train")


def test_unreadable_images_are_skipped_and_counted_or_refused(tmp_path):
    make_image_folder(tmp_path, per_class=3)
    (tmp_path / "class_1" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "class_2" / "bomb.png").write_bytes(png_bomb(30_000, 30_000))  # Pillow's DecompressionBombError
    source = open_split(tmp_path, "train")
    data = source.decode(range(len(source)), PRE)
    assert len(data) == 9 and data.skipped == 2
    with pytest.raises(FpetError, match=r"cannot read image .*broken\.png"):
        source.decode(range(len(source)), PRE, strict=True)


def test_grey_rgba_16bit_and_exif_rotation_become_upright_rgb():
    assert to_rgb(Image.new("L", (4, 4), 100)).getpixel((0, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("RGBA", (4, 4), (10, 20, 30, 0))).mode == "RGB"
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    image = Image.new("RGB", (8, 4))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    image.info["exif"] = exif.tobytes()
    image = Image.open(_roundtrip(image, exif))
    assert to_rgb(image).size == (4, 8)


def _roundtrip(image, exif):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    buffer.seek(0)
    return buffer


def test_split_is_seeded_and_disjoint():
    a_train, a_val = split_train_val(100, 60, 20, seed=0)
    b_train, b_val = split_train_val(100, 60, 20, seed=0)
    assert (a_train, a_val) == (b_train, b_val)
    assert len(set(a_train) | set(a_val)) == 80
    assert split_train_val(100, 60, 20, seed=1) != (a_train, a_val)
    with pytest.raises(FpetError, match="only 100"):
        split_train_val(100, 90, 20, seed=0)
    with pytest.raises(FpetError, match="none are left to train on"):
        split_train_val(100, 0, 100, seed=0)


def test_preprocessing_normalises_as_recorded():
    import torch

    pixels = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert Preprocessing(2).to_input(pixels).max() == 1.0
    imagenet = Preprocessing(2, normalize="imagenet")
    torch.testing.assert_close(
        imagenet.to_input(pixels)[0, :, 0, 0], torch.tensor([2.2489, 2.4286, 2.64]), atol=1e-3, rtol=0
    )
    assert imagenet.to_dict()["mean"] == [0.485, 0.456, 0.406]
    with pytest.raises(FpetError, match="unknown normalisation"):
        Preprocessing(2, normalize="zscore")


def test_label_groups_make_a_new_task_from_the_same_images(tmp_path):
    make_image_folder(tmp_path / "data", per_class=4)
    groups = [("warm", ["class_0", "class_1"]), ("cold", ["class_2"])]
    source = open_split(tmp_path / "data", "train", groups=groups)
    assert source.classes == ["warm", "cold"] and source.labels == [0] * 8 + [1] * 4
    assert source.names[8].endswith("class_2/000.png")
    subset = open_split(tmp_path / "data", "train", groups=[("a", ["class_2"]), ("b", ["class_0"])])
    assert subset.labels == [1] * 4 + [0] * 4 and len(subset) == 8  # class_1 is in no group: left out
    with pytest.raises(FpetError, match="not a class of the data"):
        open_split(tmp_path / "data", "train", groups=[("x", ["class_9"])])
    with pytest.raises(FpetError, match="in two label groups"):
        regroup(source, [("x", ["warm"]), ("y", ["warm"])])
    with pytest.raises(FpetError, match="label group 'a' is given twice"):
        open_split(tmp_path / "data", "train", groups=[("a", ["class_0"]), ("a", ["class_1"])])
    assert parse_label_group("footwear=Sandal, Ankle boot") == ("footwear", ["Sandal", "Ankle boot"])
    with pytest.raises(FpetError, match="NAME=CLASS"):
        parse_label_group("footwear")

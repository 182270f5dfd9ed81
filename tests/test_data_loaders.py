"""Dataset loaders on tiny datasets written by each test: COCO, VOC 2007, VG-200, list files, build_dataset."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dsrb.data.coco import load_coco
from dsrb.data.dataset import MultiLabelDataset, UnreadableImageError
from dsrb.data.listfile import load_list
from dsrb.data.registry import DATASETS, build_dataset
from dsrb.data.vg import load_vg200
from dsrb.data.voc import VOC_CLASSES, load_voc2007
from dsrb.data.words import load_word_vectors


def _image(path, size=(12, 10), colour=(10, 200, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _garbage(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image at all" * 10)
    return path


# ------------------------------------------------------------------------------------------------------------- COCO


def _coco(root, split_dir="train2014", ann_name="instances_train2014.json", bad_image=False):
    """3 images (the second without annotations), categories with unsorted, non-contiguous ids."""
    for i in range(3):
        if bad_image and i == 1:
            _garbage(root / split_dir / f"img{i}.jpg")
        else:
            _image(root / split_dir / f"img{i}.jpg", fmt="JPEG")
    data = {
        "images": [{"id": 30 + i, "file_name": f"img{i}.jpg", "width": 12, "height": 10} for i in (0, 1, 2)],
        "categories": [{"id": 7, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 5, "name": "bird"}],
        "annotations": [
            {"id": 1, "image_id": 30, "category_id": 7, "bbox": [0, 0, 1, 1], "iscrowd": 0},
            {"id": 2, "image_id": 30, "category_id": 2, "bbox": [0, 0, 1, 1], "iscrowd": 0},
            {"id": 3, "image_id": 32, "category_id": 5, "bbox": [0, 0, 1, 1], "iscrowd": 1},
            {"id": 4, "image_id": 32, "category_id": 5, "bbox": [1, 1, 1, 1], "iscrowd": 0},
        ],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / ann_name
    path.write_text(json.dumps(data))
    return path, data


def test_coco_labels_by_hand(tmp_path):
    _coco(tmp_path)
    ds = load_coco(tmp_path, "train")
    # categories sorted by id: 2 cat, 5 bird, 7 dog
    assert ds.class_names == ["cat", "bird", "dog"]
    assert ds.num_classes == 3 and len(ds) == 3 and ds.name == "coco"
    expected = torch.tensor([[1, -1, 1], [-1, -1, -1], [-1, 1, -1]], dtype=torch.int8)
    assert ds.labels.dtype == torch.int8 and torch.equal(ds.labels, expected)
    assert torch.equal(ds.targets, expected)
    assert ds.image_paths == [str(tmp_path / "train2014" / f"img{i}.jpg") for i in range(3)]
    image, target, index = ds[2]
    assert image.shape == (3, 10, 12) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert target.dtype == torch.float32 and target.tolist() == [-1.0, 1.0, -1.0] and index == 2
    # From the end, the index returned still names the image; past either end, or not an int, is an error.
    assert ds[-1][2] == 2 and ds[np.int64(-3)][2] == 0 and ds[torch.tensor(1)][2] == 1
    for bad in (3, -4):
        with pytest.raises(IndexError, match=rf"coco index {bad} is out of range for its 3 images"):
            ds[bad]
    with pytest.raises(TypeError):
        ds[1.5]


def test_coco_test_split_is_val2014_and_transform(tmp_path):
    _coco(tmp_path, "val2014", "instances_val2014.json")
    ds = load_coco(tmp_path, "test", transform=lambda im: torch.zeros(3, 4, 4))
    assert ds.image_paths[0] == str(tmp_path / "val2014" / "img0.jpg")
    assert ds[0][0].shape == (3, 4, 4)


def test_coco_explicit_files(tmp_path):
    ann, _ = _coco(tmp_path, "somewhere", "mine.json")
    ds = load_coco(None, "train", annotation=ann, image_dir=tmp_path / "somewhere")
    assert len(ds) == 3 and ds.labels[0].tolist() == [1, -1, 1]


def test_coco_unknown_image_id_names_file_and_record(tmp_path):
    path, data = _coco(tmp_path)
    data["annotations"][3]["image_id"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_train2014\.json.*annotations\[3\].*999"):
        load_coco(tmp_path, "train")


def test_coco_unknown_category_and_missing_key(tmp_path):
    path, data = _coco(tmp_path)
    data["annotations"][0]["category_id"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[0\].*category_id 1"):
        load_coco(tmp_path, "train")
    path, data = _coco(tmp_path)
    del data["images"][1]["file_name"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_train2014\.json: images\[1\]: missing key 'file_name'"):
        load_coco(tmp_path, "train")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_coco(tmp_path, "train")


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_json_errors_count_lines_as_an_editor(tmp_path, newline):
    """json's line numbers count only \\n: a file of \\r line ends reported its error on line 1 at column 33."""
    path, _ = _coco(tmp_path)
    path.write_bytes(newline.join(['{', '"images": [],', '  "annotations": [,]', '}']).encode())
    with pytest.raises(ValueError, match=r"train2014\.json: not valid JSON: Expecting value: line 3 column 19 \(char"):
        load_coco(tmp_path, "train")
    path.write_bytes(newline.join(['{', '"images": []', '']).encode())  # the error at the end of the file
    with pytest.raises(ValueError, match=r"not valid JSON: Expecting ',' delimiter: line 3 column 1 "):
        load_coco(tmp_path, "train")
    path.write_bytes(newline.join(['{"images": []', '']).encode() + b"x")  # right after a line end
    with pytest.raises(ValueError, match=r"not valid JSON: Expecting ',' delimiter: line 2 column 1 "):
        load_coco(tmp_path, "train")


def test_coco_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"instances_train2014\.json.*layout"):
        load_coco(tmp_path, "train")
    _coco(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"val2014"):
        load_coco(tmp_path, "test")
    with pytest.raises(ValueError, match="'split'"):
        load_coco(tmp_path, "val")
    # annotations present, image folder missing
    (tmp_path / "annotations" / "instances_val2014.json").write_text(
        (tmp_path / "annotations" / "instances_train2014.json").read_text()
    )
    with pytest.raises(FileNotFoundError, match="image folder not found: .*val2014"):
        load_coco(tmp_path, "test")


def test_coco_duplicate_names_and_bad_ids_name_the_file(tmp_path):
    path, data = _coco(tmp_path)
    data["categories"][2]["name"] = "dog"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_train2014\.json: categories\[2\]: duplicate category name 'dog' "
                                         r"\(also categories\[0\]\)"):
        load_coco(tmp_path, "train")
    for section, i, key, value in (("images", 1, "id", [31]), ("categories", 0, "id", {"a": 7}),
                                   ("annotations", 2, "image_id", True), ("annotations", 0, "category_id", None)):
        path, data = _coco(tmp_path)
        data[section][i][key] = value
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=rf"instances_train2014\.json: {section}\[{i}\]: '{key}' must be a "
                                             "number or a string"):
            load_coco(tmp_path, "train")


def test_coco_category_name_must_be_a_non_empty_string(tmp_path):
    """A null, list, number or empty name used to become a class named 'None', "['a']", '7' or ''."""
    for value in (None, ["a"], 7, "", "  "):
        path, data = _coco(tmp_path)
        data["categories"][1]["name"] = value
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError) as info:
            load_coco(tmp_path, "train")
        assert str(info.value) == f"{path}: categories[1]: 'name' must be a non-empty string, got {value!r}"


def test_coco_ids_written_as_digit_strings_sort_as_numbers_and_file_names_are_strings(tmp_path):
    path, data = _coco(tmp_path)
    for cat in data["categories"]:  # 7 dog, 2 cat, 5 bird -> "7", "10", "5"
        cat["id"] = {7: "7", 2: "10", 5: "5"}[cat["id"]]
    for ann in data["annotations"]:
        ann["category_id"] = {7: "7", 2: "10", 5: "5"}[ann["category_id"]]
    path.write_text(json.dumps(data))
    ds = load_coco(tmp_path, "train")
    assert ds.class_names == ["bird", "dog", "cat"]  # 5, 7, 10 (as text: "10", "5", "7")
    assert ds.labels.tolist() == [[-1, 1, 1], [-1, -1, -1], [1, -1, -1]]
    # Signs: "+5" and "-5" are numbers; "+-5" or "--5" is no number (int() raised a bare ValueError): text order.
    for ids, names in ((["+7", "10", "-5"], ["bird", "dog", "cat"]), (["7", "10", "+-5"], ["bird", "cat", "dog"])):
        for cat, cid in zip(data["categories"], ids):
            cat["id"] = cid
        data["annotations"] = []
        path.write_text(json.dumps(data))
        assert load_coco(tmp_path, "train").class_names == names
    for value in (None, 7, ""):
        data["images"][1]["file_name"] = value
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=r"instances_train2014\.json: images\[1\]: 'file_name' must be a "
                                             "non-empty string"):
            load_coco(tmp_path, "train")


def test_missing_image_is_found_when_the_dataset_is_built(tmp_path):
    """A listed image that is not a file is an error naming it when the dataset is built, not at its turn in an
    epoch; skip_bad drops it instead."""
    _coco(tmp_path)
    (tmp_path / "train2014" / "img2.jpg").unlink()
    missing = str(tmp_path / "train2014" / "img2.jpg")
    with pytest.raises(FileNotFoundError, match="dataset 'coco' .*1 of the 3 images are missing, the first "
                       f"{missing}; .*--skip-bad-images"):
        build_dataset("coco", "train", root=tmp_path)
    ds = build_dataset("coco", "train", root=tmp_path, skip_bad=True)
    assert len(ds) == 2 and missing not in ds.image_paths
    assert load_coco(tmp_path, "train").missing_images() == [missing]


def test_corrupt_image_getitem_and_verify(tmp_path):
    _coco(tmp_path, bad_image=True)
    ds = load_coco(tmp_path, "train")
    bad = str(tmp_path / "train2014" / "img1.jpg")
    ds[0]
    with pytest.raises(UnreadableImageError, match="cannot read image .*img1.jpg.*--skip-bad-images") as info:
        ds[1]
    assert bad in str(info.value)
    with pytest.raises(UnreadableImageError, match="img1.jpg"):
        ds.verify_images(skip_bad=False)
    partial = torch.tensor([[0, -1, 1], [1, 0, 0], [0, 1, 0]])
    ds.set_targets(partial)
    assert ds.listed_rows.tolist() == [0, 1, 2]
    assert ds.verify_images(skip_bad=True) == 1 and ds.skipped == 1
    assert len(ds) == 2 and bad not in ds.image_paths and ds.listed_rows.tolist() == [0, 2]
    assert ds.labels.tolist() == [[1, -1, 1], [-1, 1, -1]]
    assert ds.targets.tolist() == [[0, -1, 1], [0, 1, 0]]
    assert ds[1][1].tolist() == [0.0, 1.0, 0.0]


def test_skip_bad_decodes_every_image(tmp_path):
    """A truncated JPEG passes PIL's verify() (which reads no image data) and fails when decoded: skip_bad drops it
    beforehand instead of the run failing at its turn."""
    _coco(tmp_path)
    big = tmp_path / "train2014" / "img1.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(big, format="JPEG")
    big.write_bytes(big.read_bytes()[:-400])
    ds = load_coco(tmp_path, "train")
    with pytest.raises(UnreadableImageError, match="img1.jpg.*truncated"):
        ds[1]
    with pytest.raises(UnreadableImageError, match="img1.jpg.*truncated"):
        ds.verify_images(skip_bad=False)
    assert ds.verify_images(skip_bad=True) == 1 and ds.listed_rows.tolist() == [0, 2]


def test_skip_bad_checks_each_file_whole(tmp_path):
    """As the README says: skip_bad also drops a damaged file whose pixels still decode (a PNG without its end
    marker), which the dataset loads without it."""
    _coco(tmp_path)
    png = tmp_path / "train2014" / "img1.jpg"  # Pillow reads the format from the bytes, not the name
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(png, format="PNG")
    png.write_bytes(png.read_bytes()[:-12])  # the IEND chunk: length, type and CRC
    ds = load_coco(tmp_path, "train")
    assert ds[1][0].shape == (3, 8, 8)
    with pytest.raises(UnreadableImageError, match="img1.jpg.*truncated PNG"):
        ds.verify_images(skip_bad=False)
    assert ds.verify_images(skip_bad=True) == 1 and ds.listed_rows.tolist() == [0, 2]


def test_image_keys_stay_when_the_folder_moves_or_images_are_dropped(tmp_path):
    _coco(tmp_path / "a", bad_image=True)
    _coco(tmp_path / "b" / "deeper")
    ds = load_coco(tmp_path / "a", "train")
    assert ds.image_keys() == ["img0.jpg", "img1.jpg", "img2.jpg"]
    ds.verify_images(skip_bad=True)
    assert ds.image_keys() == ["img0.jpg", "img2.jpg"]
    assert load_coco(tmp_path / "b" / "deeper", "train").image_keys() == ["img0.jpg", "img1.jpg", "img2.jpg"]
    ds = MultiLabelDataset([str(tmp_path / "x" / "1.jpg"), str(tmp_path / "y" / "z" / "1.jpg")], [[1], [1]], ["c"])
    assert ds.image_keys() == ["x/1.jpg", "y/z/1.jpg"]


def test_image_keys_of_images_outside_the_root_are_absolute_and_the_others_move_with_the_root(tmp_path):
    """An image named by absolute path outside the loader's folder used to move the folder the keys start from up to
    what holds it too, so the keys of every other image took the data root's own path, and a resume from a moved
    root found none of them in partial_labels.npz."""
    outside = _list_root(tmp_path / "a" / "list")  # imgs/a.png, <absolute>/c.png, imgs/b.png
    _coco(tmp_path / "a" / "coco")
    coco_json = tmp_path / "a" / "coco" / "annotations" / "instances_train2014.json"
    data = json.loads(coco_json.read_text())
    data["images"][1]["file_name"] = str(outside)
    coco_json.write_text(json.dumps(data))
    _vg(tmp_path / "a" / "vg")
    labels = {"3.jpg": [5], str(outside): [7]}
    (tmp_path / "a" / "vg" / "vg_category_200_labels_index.json").write_text(json.dumps(labels))
    (tmp_path / "a" / "vg" / "train_list_500.txt").write_text(f"3.jpg\n{outside}\n")
    absolute = outside.as_posix()
    expected = {"list": ["imgs/a.png", absolute, "imgs/b.png"], "coco": ["img0.jpg", absolute, "img2.jpg"],
                "vg": ["3.jpg", absolute]}
    for root in (tmp_path / "a", tmp_path / "moved" / "deeper"):
        if not root.exists():
            shutil.copytree(tmp_path / "a", root)
        assert load_list(root / "list" / "train.csv").image_keys() == expected["list"]
        assert load_coco(root / "coco", "train").image_keys() == expected["coco"]
        assert load_vg200(root / "vg", "train").image_keys() == expected["vg"]
    ds = MultiLabelDataset([str(tmp_path / "r" / "x" / "1.jpg"), str(outside), str(tmp_path / "r" / "y" / "1.jpg"),
                            str(tmp_path / "r2" / "z.jpg")], [[1]] * 4, ["c"], image_root=tmp_path / "r")
    assert ds.image_keys() == ["x/1.jpg", absolute, "y/1.jpg", (tmp_path / "r2" / "z.jpg").as_posix()]
    assert MultiLabelDataset([str(outside)], [[1]], ["c"], image_root=tmp_path / "r").image_keys() == [absolute]


def test_missing_image_names_path(tmp_path):
    ds = MultiLabelDataset([str(tmp_path / "nope.png")], [[1, -1]], ["a", "b"])
    with pytest.raises(UnreadableImageError, match="nope.png"):
        ds[0]


# -------------------------------------------------------------------------------------------------------------- VOC


def _voc_xml(objects):
    body = "".join(
        f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated><difficult>{d}</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        for n, d in objects
    )
    return f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename>{body}</annotation>"


def _voc(root):
    base = root / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations").mkdir()
    annotations = {
        "000005": [("chair", 0), ("chair", 1), ("person", 0)],
        "000007": [("car", 0)],
        "000009": [("dog", 1), ("horse", 0)],  # dog only difficult -> -1
    }
    for image_id, objects in annotations.items():
        (base / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(objects))
        _image(base / "JPEGImages" / f"{image_id}.jpg", fmt="JPEG")
    (base / "ImageSets" / "Main" / "trainval.txt").write_text("000009\n000005\n\n")
    (base / "ImageSets" / "Main" / "test.txt").write_text("000007\n")
    return base


def test_voc_labels_by_hand(tmp_path):
    base = _voc(tmp_path)
    ds = load_voc2007(tmp_path, "train")
    assert ds.class_names == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    assert ds.class_names[:3] == ["aeroplane", "bicycle", "bird"] and ds.class_names[-1] == "tvmonitor"
    assert ds.image_paths == [str(base / "JPEGImages" / "000009.jpg"), str(base / "JPEGImages" / "000005.jpg")]
    c = VOC_CLASSES.index
    expected = -np.ones((2, 20), dtype=np.int8)
    expected[0, c("horse")] = 1
    expected[1, c("chair")] = 1
    expected[1, c("person")] = 1
    assert np.array_equal(ds.labels.numpy(), expected)
    assert ds.labels[0, c("dog")] == -1  # difficult-only class
    test = load_voc2007(base, "test")  # root pointing at VOC2007 itself
    assert len(test) == 1 and test.labels[0, c("car")] == 1 and int(test.labels[0].sum()) == -18
    assert test[0][0].shape == (3, 10, 12)


def test_voc_errors_name_path(tmp_path):
    base = _voc(tmp_path)
    bad = base / "Annotations" / "000005.xml"
    bad.write_text("this is <not xml")
    with pytest.raises(ValueError, match=r"000005\.xml.*not a valid XML"):
        load_voc2007(tmp_path, "train")
    bad.write_text(_voc_xml([("unicorn", 0)]))
    with pytest.raises(ValueError, match=r"000005\.xml.*unknown class 'unicorn'"):
        load_voc2007(tmp_path, "train")
    bad.unlink()
    with pytest.raises(FileNotFoundError, match=r"000005\.xml"):
        load_voc2007(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"VOC2007.*ImageSets.*layout"):
        load_voc2007(tmp_path / "elsewhere", "train")
    with pytest.raises(ValueError, match=r"argument 'root': expected the VOC 2007 folder, got None"):
        load_voc2007(None, "train")
    (base / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.txt"):
        load_voc2007(tmp_path, "test")


def test_voc_class_names_in_any_case(tmp_path):
    """A <name> in upper case ('Chair', as annotation tools write it) stopped the dataset with "unknown class"; the
    VOC names are distinct in any case, so it is the class of that name."""
    base = _voc(tmp_path)
    want = load_voc2007(tmp_path, "train").labels
    (base / "Annotations" / "000005.xml").write_text(_voc_xml([("Chair", 0), ("CHAIR", 1), (" Person ", 0)]))
    (base / "Annotations" / "000009.xml").write_text(_voc_xml([("DOG", 1), ("horse", 0)]))
    assert torch.equal(load_voc2007(tmp_path, "train").labels, want)


# --------------------------------------------------------------------------------------------------------------- VG


def _vg(root, names=None):
    root.mkdir(parents=True, exist_ok=True)
    labels = {"1.jpg": [0, 199], "2.jpg": [], "3.jpg": [5, 5, 17]}
    (root / "vg_category_200_labels_index.json").write_text(json.dumps(labels))
    (root / "train_list_500.txt").write_text("3.jpg\n1.jpg\n")
    (root / "test_list_500.txt").write_text("2.jpg\n")
    for f in labels:
        _image(root / "VG_100K" / f, fmt="JPEG")
    if names is not None:
        (root / "vg_category_200.json").write_text(json.dumps(names))


def test_vg_labels_by_hand(tmp_path):
    _vg(tmp_path)
    ds = load_vg200(tmp_path, "train")
    assert ds.num_classes == 200 and ds.class_names[0] == "class_000" and ds.class_names[199] == "class_199"
    assert ds.image_paths == [str(tmp_path / "VG_100K" / "3.jpg"), str(tmp_path / "VG_100K" / "1.jpg")]
    assert ds.labels[0].nonzero().numel() == 200  # no zeros
    assert (ds.labels[0] == 1).nonzero().flatten().tolist() == [5, 17]
    assert (ds.labels[1] == 1).nonzero().flatten().tolist() == [0, 199]
    test = load_vg200(tmp_path, "test")
    assert len(test) == 1 and bool((test.labels == -1).all())


def test_vg_class_names_file(tmp_path):
    names = [f"thing {i}" for i in range(200)]
    _vg(tmp_path, names={n: i for i, n in enumerate(names)})
    assert load_vg200(tmp_path, "train").class_names == names
    (tmp_path / "vg_category_200.json").write_text(json.dumps(names[:3]))
    with pytest.raises(ValueError, match=r"vg_category_200\.json: expected 200 class names, found 3"):
        load_vg200(tmp_path, "train")
    # A key that isdigit() but int() cannot read ('²') raised int()'s bare ValueError, naming no file.
    (tmp_path / "vg_category_200.json").write_text(json.dumps({"\u00b2": "a", **{str(i): n for i, n in
                                                                                  enumerate(names[1:], 1)}}))
    with pytest.raises(ValueError, match=r"vg_category_200\.json: expected a list of class names"):
        load_vg200(tmp_path, "train")


def test_vg_placeholder_names_refuse_glove_text_files(tmp_path):
    """'class_007' would be looked up as 'class' and '007': meaningless vectors, so an error pointing to the names."""
    _vg(tmp_path / "vg")
    names = load_vg200(tmp_path / "vg", "train").class_names
    glove = tmp_path / "glove.txt"
    glove.write_text("class 1 2\n" + "".join(f"{i:03d} 0 {i}\n" for i in range(200)))
    with pytest.raises(ValueError, match=r"placeholders .*vg_category_200\.json.*\.npy"):
        load_word_vectors(glove, names)
    np.save(tmp_path / "v.npy", np.ones((200, 2)))  # rows by index: no names needed
    assert load_word_vectors(tmp_path / "v.npy", names).shape == (200, 2)


def test_vg_duplicate_class_names_name_the_file(tmp_path):
    names = [f"thing {i}" for i in range(200)]
    names[7] = "thing 3"
    _vg(tmp_path, names=names)
    with pytest.raises(ValueError, match=r"vg_category_200\.json: class name 'thing 3' appears at indices 3 and 7"):
        load_vg200(tmp_path, "train")
    (tmp_path / "vg_category_200.json").unlink()
    (tmp_path / "vg_category_200.txt").write_text("\n".join(names) + "\n")
    with pytest.raises(ValueError, match=r"vg_category_200\.txt: line 8: class 'thing 3' already given on line 4"):
        load_vg200(tmp_path, "train")


@pytest.mark.parametrize("blank", ["", "  "])
def test_vg_blank_class_name_names_the_file(tmp_path, blank):
    """A JSON list with a blank name (a text file skips blank lines) gave a class no table or plot could name."""
    names = [f"thing {i}" for i in range(200)]
    names[42] = blank
    _vg(tmp_path, names=names)
    with pytest.raises(ValueError, match=rf"vg_category_200\.json: class 42 has a blank name {blank!r}"):
        load_vg200(tmp_path, "train")


def test_vg_errors_name_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vg_category_200_labels_index\.json"):
        load_vg200(tmp_path, "train")
    _vg(tmp_path)
    (tmp_path / "test_list_500.txt").write_text("2.jpg\nmissing.jpg\n")
    with pytest.raises(ValueError, match=r"test_list_500\.txt: line 2: image 'missing.jpg'"):
        load_vg200(tmp_path, "test")
    (tmp_path / "vg_category_200_labels_index.json").write_text(json.dumps({"1.jpg": [200], "3.jpg": []}))
    with pytest.raises(ValueError, match=r"labels_index\.json: entry '1.jpg': class index 200"):
        load_vg200(tmp_path, "train")
    (tmp_path / "train_list_500.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_list_500\.txt"):
        load_vg200(tmp_path, "train")


# ------------------------------------------------------------------------------------------------------------- list


def _list_root(root):
    _image(root / "imgs" / "a.png")
    _image(root / "imgs" / "b.png")
    outside = _image(root.parent / f"{root.name}-outside" / "c.png")
    (root / "train.csv").write_text(
        f"path,labels\nimgs/a.png,cat; dog\n\n{outside},\n\"imgs/b.png\",sofa;cat\n"
    )
    (root / "test.csv").write_text("path,labels\nimgs/b.png,zebra\n")
    return outside


def test_list_labels_by_hand(tmp_path):
    outside = _list_root(tmp_path)
    ds = load_list(tmp_path / "train.csv")
    assert ds.class_names == ["cat", "dog", "sofa"]
    assert ds.image_paths == [str(tmp_path / "imgs" / "a.png"), str(outside), str(tmp_path / "imgs" / "b.png")]
    assert ds.labels.tolist() == [[1, 1, -1], [-1, -1, -1], [1, -1, 1]]
    ds = load_list(tmp_path / "train.csv", classes=["sofa", "dog", "cat", "zebra"], image_root="/data")
    assert ds.labels.tolist() == [[-1, 1, 1, -1], [-1, -1, -1, -1], [1, -1, 1, -1]]
    assert ds.image_paths[0] == "/data/imgs/a.png"
    # tab-separated variant, class file
    (tmp_path / "t.tsv").write_text("path\tlabels\nimgs/a.png\tdog\n")
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    ds = load_list(tmp_path / "t.tsv", classes=tmp_path / "classes.txt")
    assert ds.class_names == ["dog", "cat"] and ds.labels.tolist() == [[1, -1]]
    # the delimiter is read from the first line that is not blank (blank lines are skipped)
    (tmp_path / "t.tsv").write_text("\n \npath\tlabels\nimgs/a.png\tdog\n")
    assert load_list(tmp_path / "t.tsv", classes=["dog", "cat"]).labels.tolist() == [[1, -1]]


def test_list_errors(tmp_path):
    _list_root(tmp_path)
    with pytest.raises(ValueError, match=r"train\.csv: line 2: unknown class 'dog'"):
        load_list(tmp_path / "train.csv", classes=["cat", "sofa"])
    (tmp_path / "bad.csv").write_text("image,classes\na.png,cat\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 1: expected the header 'path,labels'"):
        load_list(tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("path,labels\na.png,cat,dog\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 2: expected 2 fields"):
        load_list(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        load_list(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match=r"argument 'path': expected the list file, got None"):
        load_list(None)
    # A class whose name holds the labels' separator: no row could name it, so it silently had no positive.
    (tmp_path / "classes.txt").write_text("cat\nsofa;bed\ndog\n")
    with pytest.raises(ValueError, match=r"classes\.txt: class 'sofa;bed' contains ';', which separates"):
        load_list(tmp_path / "train.csv", classes=tmp_path / "classes.txt")
    with pytest.raises(ValueError, match=r"^argument 'classes': class 'sofa;bed' contains ';'"):
        load_list(tmp_path / "train.csv", classes=["cat", "sofa;bed", "dog"])


def test_a_list_of_no_class_is_named(tmp_path):
    """No class at all (rows without labels, an empty classes.txt, ``classes=[]``) was a dataset of C = 0, which
    failed later as a test split without a positive or an unknown class among "known classes: " and none listed; a
    classes.txt that is a folder was passed over for train.csv's names."""
    (tmp_path / "train.csv").write_text("path,labels\na.png,\nb.png,\n")
    with pytest.raises(ValueError, match=r"train\.csv: no row names a class, so there is nothing to learn"):
        load_list(tmp_path / "train.csv")
    (tmp_path / "classes.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"classes\.txt: expected at least one class name, got none"):
        load_list(tmp_path / "train.csv", classes=tmp_path / "classes.txt")
    with pytest.raises(ValueError, match=r"^argument 'classes': expected at least one class name, got none"):
        load_list(tmp_path / "train.csv", classes=[])
    (tmp_path / "classes.txt").unlink()
    (tmp_path / "classes.txt").mkdir()
    (tmp_path / "train.csv").write_text("path,labels\na.png,cat\n")
    with pytest.raises(ValueError, match=r"classes\.txt: a folder; expected a file of class names"):
        build_dataset("list", "train", root=tmp_path)


def test_list_stray_quote_in_a_long_file_names_the_file_and_line(tmp_path):
    """A field opened by a quote that is never closed runs on to the end of the file; past csv's field size limit
    (128 KiB: a list of a few thousand images) that was a bare _csv.Error traceback naming neither file nor line."""
    rows = ["path,labels", "a.png,cat", '"b.png,dog'] + [f"img{i:06d}.png,cat" for i in range(10000)]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"l\.csv: line 3: .*field larger than field limit"):
        load_list(tmp_path / "l.csv")


def test_list_rows_end_at_newlines_only(tmp_path):
    """U+2028, \\x85 and \\x0c are no row ends (str.splitlines would split there); quoted commas and newlines stay in
    their field, and error lines count the lines of a quoted newline."""
    names = ["a\u2028b.png", "c\x85d\x0ce.png", "f,g.png", "h\ni.png"]
    rows = ["path,labels", f"{names[0]},cat", f"{names[1]},dog", f'"{names[2]}",cat', f'"{names[3]}",dog', "j.png,"]
    (tmp_path / "l.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode("utf-8"))
    ds = load_list(tmp_path / "l.csv")
    assert ds.image_paths == [str(tmp_path / n) for n in names + ["j.png"]]
    assert ds.labels.tolist() == [[1, -1], [-1, 1], [1, -1], [-1, 1], [-1, -1]]
    (tmp_path / "classes.txt").write_bytes("x\u2028y\r\ncat\rdog\n".encode("utf-8"))
    assert load_list(tmp_path / "l.csv", classes=tmp_path / "classes.txt").class_names == ["x\u2028y", "cat", "dog"]
    (tmp_path / "l.csv").write_bytes(("\n".join(rows[:-1] + ["j.png,cow"]) + "\n").encode("utf-8"))
    with pytest.raises(ValueError, match=r"l\.csv: line 7: unknown class 'cow'"):
        load_list(tmp_path / "l.csv", classes=["cat", "dog"])


def test_list_quoted_field_after_a_space_is_unquoted(tmp_path):
    """'path, labels' is accepted, so is a space after the comma in a row; a quoted field after it used to keep its
    quotes, giving the classes '"cat' and 'dog"'."""
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "b,c.png")
    (tmp_path / "l.csv").write_text('path, labels\nimgs/a.png, "cat;dog"\n "imgs/b,c.png" ,  cat\n')
    ds = load_list(tmp_path / "l.csv")
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [[1, 1], [1, -1]]
    assert ds.image_paths == [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "b,c.png")]
    (tmp_path / "t.tsv").write_text('path\t labels\nimgs/a.png\t "cat;dog"\n')
    assert load_list(tmp_path / "t.tsv").class_names == ["cat", "dog"]


def _text_files(root):
    """{kind: (text file, loader call)} for every kind of text file the loaders read."""
    _coco(root / "coco")
    _voc(root / "voc")
    _vg(root / "vg")
    _list_root(root / "list")
    (root / "list" / "classes.txt").write_text("cat\ndog\nsofa\nzebra\n")
    for path in (root / "coco" / "annotations" / "instances_train2014.json",
                 root / "vg" / "vg_category_200_labels_index.json"):
        path.write_text(json.dumps(json.loads(path.read_text()), indent=1))  # several lines
    return {
        "list csv": (root / "list" / "train.csv", lambda: load_list(root / "list" / "train.csv")),
        "classes.txt": (root / "list" / "classes.txt", lambda: build_dataset("list", "train", root=root / "list")),
        "coco json": (root / "coco" / "annotations" / "instances_train2014.json", lambda: load_coco(root / "coco",
                                                                                                    "train")),
        "voc ids": (root / "voc" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt",
                    lambda: load_voc2007(root / "voc", "train")),
        "vg labels": (root / "vg" / "vg_category_200_labels_index.json", lambda: load_vg200(root / "vg", "train")),
        "vg list": (root / "vg" / "train_list_500.txt", lambda: load_vg200(root / "vg", "train")),
    }


@pytest.mark.parametrize("kind", ["list csv", "classes.txt", "coco json", "voc ids", "vg labels", "vg list"])
def test_text_file_not_utf8_names_the_file(tmp_path, kind):
    path, load = _text_files(tmp_path)[kind]
    text = path.read_bytes()
    at = text.index(b"\n") + 1  # the start of line 2
    path.write_bytes(text[:at] + "\u00e9".encode("latin-1") + text[at:])
    with pytest.raises(ValueError) as info:
        load()
    assert str(info.value) == (f"{path}: line 2: not UTF-8 text (byte 0xe9 at byte offset {at}: invalid continuation "
                               "byte); save the file as UTF-8")


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
@pytest.mark.parametrize("kind", ["list csv", "classes.txt", "voc ids", "vg list"])
def test_text_file_not_utf8_names_the_line_whatever_the_line_ends(tmp_path, kind, newline):
    """The lines are split at \\r\\n, \\r or \\n (read_lines); the line of a byte that is not UTF-8 counted \\n only, so
    with classic Mac line ends (\\r) every such byte was on line 1."""
    path, load = _text_files(tmp_path)[kind]
    lines = path.read_bytes().splitlines()
    lines[1] = "\u00e9".encode("latin-1") + lines[1]
    path.write_bytes(newline.join(lines) + newline)
    with pytest.raises(ValueError, match=r": line 2: not UTF-8 text \(byte 0xe9"):
        load()


@pytest.mark.parametrize("kind", ["coco json", "voc ids", "vg list"])
def test_text_file_may_start_with_a_byte_order_mark(tmp_path, kind):
    path, load = _text_files(tmp_path)[kind]
    expected = load()
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ds = load()
    assert ds.image_paths == expected.image_paths and torch.equal(ds.labels, expected.labels)


# ---------------------------------------------------------------------------------------------------- build_dataset


def test_build_dataset_dispatch(tmp_path):
    _coco(tmp_path / "coco")
    _voc(tmp_path / "voc")
    _vg(tmp_path / "vg")
    _list_root(tmp_path / "list")
    ds = build_dataset("coco", "train", root=tmp_path / "coco")
    assert ds.name == "coco" and ds.class_names == ["cat", "bird", "dog"] and ds.skipped == 0
    assert build_dataset("voc", "test", root=tmp_path / "voc").num_classes == 20
    assert len(build_dataset("vg", "train", root=str(tmp_path / "vg"))) == 2
    tr = build_dataset("list", "train", root=tmp_path / "list", transform=lambda im: torch.ones(3, 2, 2))
    assert tr.class_names == ["cat", "dog", "sofa"] and tr[0][0].shape == (3, 2, 2)
    # without classes.txt both splits take train.csv's classes: one only in test.csv is an error, not a class that
    # has no training positive
    train_csv = tmp_path / "list" / "train.csv"
    with pytest.raises(ValueError, match=r"test\.csv: line 2: unknown class 'zebra'; known classes \(the classes of "
                       f"{train_csv}\\): cat, dog, sofa"):
        build_dataset("list", "test", root=tmp_path / "list")
    (tmp_path / "list" / "test.csv").write_text("path,labels\nimgs/b.png,dog\nimgs/a.png,\n")
    te = build_dataset("list", "test", root=tmp_path / "list")
    assert te.class_names == ["cat", "dog", "sofa"] and te.labels.tolist() == [[-1, 1, -1], [-1, -1, -1]]
    (tmp_path / "list" / "classes.txt").write_text("zebra\nsofa\ndog\ncat\n")
    assert build_dataset("list", "test", root=tmp_path / "list").class_names == ["zebra", "sofa", "dog", "cat"]
    (tmp_path / "list" / "test.csv").write_text("path,labels\nimgs/b.png,gnu\n")
    with pytest.raises(ValueError, match=r"unknown class 'gnu'; known classes \(the classes of .*classes\.txt\)"):
        build_dataset("list", "test", root=tmp_path / "list")
    assert set(DATASETS) == {"builtin", "coco", "voc", "vg", "list"}


def test_build_dataset_errors(tmp_path, caplog):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*builtin, coco, voc, vg, list"):
        build_dataset("imagenet", "train", root=tmp_path)
    for name in ("coco", "voc", "vg", "list"):
        with pytest.raises(ValueError, match=f"'root': dataset '{name}' needs root"):
            build_dataset(name, "train")
    with pytest.raises(ValueError, match="'split'"):
        build_dataset("coco", "val", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train\.csv"):
        build_dataset("list", "train", root=tmp_path)
    _coco(tmp_path / "coco", bad_image=True)
    with caplog.at_level(logging.WARNING, logger="dsrb.data"):
        ds = build_dataset("coco", "train", root=tmp_path / "coco", skip_bad=True)
    assert ds.skipped == 1 and len(ds) == 2
    assert "skipped 1 unreadable image" in caplog.text


@pytest.mark.parametrize("value", [3, ["a"]])
def test_a_root_path_or_split_of_the_wrong_type_is_named(tmp_path, value):
    """A number or a list for a folder or file failed in pathlib or os.fspath ("expected str, bytes or os.PathLike
    object, not int"), a list for a split was unhashable: none named the argument. A config file given as a
    pathlib.Path failed at path.lower() (AttributeError)."""
    from dsrb.config import load_config_file
    from dsrb.data.builtin import ensure_builtin

    path = r"argument '{}': expected a path \(str or os.PathLike\), got "
    for load in (load_coco, load_voc2007, load_vg200):
        with pytest.raises(TypeError, match=path.format("root")):
            load(value, "train")
        with pytest.raises(ValueError, match="argument 'split': expected 'train' or 'test'"):
            load(tmp_path, value)
    with pytest.raises(TypeError, match=path.format("root")):
        build_dataset("coco", "train", root=value)
    with pytest.raises(TypeError, match=path.format("root")):
        ensure_builtin(value)
    with pytest.raises(TypeError, match=path.format("path")):
        load_list(value)
    with pytest.raises(TypeError, match=path.format("path")):
        load_word_vectors(value, ["cat"])
    with pytest.raises(TypeError, match=path.format("path")):
        load_config_file(value)
    (tmp_path / "c.json").write_text('{"epochs": 3}')
    assert load_config_file(tmp_path / "c.json")["epochs"] == 3


# ---------------------------------------------------------------------------------------------------- set_targets


@pytest.mark.parametrize("value", [None, 3])
def test_dataset_paths_and_class_names_must_be_sequences(value):
    """None failed with Python's "'NoneType' object is not iterable", naming no argument."""
    with pytest.raises(TypeError, match="argument 'image_paths': expected a sequence of paths, got"):
        MultiLabelDataset(value, np.ones((1, 1)), ["x"])
    with pytest.raises(TypeError, match="argument 'class_names': expected a sequence of class names, got"):
        MultiLabelDataset(["a.png"], np.ones((1, 1)), value)


def test_set_targets_validation():
    ds = MultiLabelDataset(["a.png", "b.png"], np.array([[1, -1, -1], [-1, 1, 1]]), ["x", "y", "z"], name="t")
    assert ds.labels.dtype == torch.int8 and ds.targets.dtype == torch.int8
    ds.set_targets(torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 1.0]]))
    assert ds.targets.dtype == torch.int8 and ds.targets.tolist() == [[0, -1, 0], [1, 0, 1]]
    assert ds.labels.tolist() == [[1, -1, -1], [-1, 1, 1]]  # full labels untouched
    with pytest.raises(ValueError, match=r"'targets': expected shape \(2, 3\)"):
        ds.set_targets(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"'targets': expected values in \{-1, 0, 1\}, found 2"):
        ds.set_targets(torch.tensor([[0, 2, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"'targets'.*found 0.5"):
        ds.set_targets(np.full((2, 3), 0.5))
    with pytest.raises(TypeError, match="'targets'"):
        ds.set_targets(torch.zeros(2, 3, dtype=torch.bool))
    # 0/1 labels in an unsigned dtype cannot say "absent": every negative read as unknown, silently.
    for multi_hot in (np.array([[1, 0, 0], [0, 1, 1]], dtype=np.uint8), torch.tensor([[1, 0, 0], [0, 1, 1]],
                                                                                      dtype=torch.uint8)):
        with pytest.raises(TypeError, match="'labels': .*cannot hold -1"):
            MultiLabelDataset(["a.png", "b.png"], multi_hot, ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"'labels': expected shape \(2, 3\)"):
        MultiLabelDataset(["a.png", "b.png"], [[1, -1, 1]], ["x", "y", "z"])
    with pytest.raises(ValueError, match="'class_names'.*'x'"):
        MultiLabelDataset(["a.png"], [[1, -1]], ["x", "x"])
    # A reversed NumPy view (negative strides) or a big-endian array is a matrix like any other: torch.as_tensor
    # refused them, and the TypeError called them no matrix of -1/0/1 values.
    full = np.array([[1, -1, -1], [-1, 1, 1]], dtype=np.int8)
    ds.set_targets(full[::-1, ::-1])
    assert ds.targets.tolist() == [[1, 1, -1], [-1, -1, 1]]
    ds.set_targets(full.astype(">i2"))
    assert ds.targets.tolist() == full.tolist()
    assert MultiLabelDataset(["a.png", "b.png"], full[::-1], ["x", "y", "z"]).labels.tolist() == full[::-1].tolist()
    # labels copied, not aliased
    src = torch.ones(1, 2, dtype=torch.int8)
    ds = MultiLabelDataset(["a.png"], src, ["x", "y"])
    src[0, 0] = -1
    assert ds.labels.tolist() == [[1, 1]]


# ------------------------------------------------------------------------------------------------- worker lifetime


class _FailsAt(torch.utils.data.Dataset):
    """Item ``bad`` raises (an unreadable image, in a worker); the others are their index."""

    def __init__(self, bad):
        self.bad = bad

    def __len__(self):
        return 8

    def __getitem__(self, index):
        if index == self.bad:
            raise ValueError(f"cannot read item {index}")
        return torch.tensor(index)


@pytest.mark.parametrize("end", ["worker error", "error in the loop", "break", "exhausted"])
def test_batches_stops_the_workers_when_the_loop_ends(end):
    """dsrb._loader.batches: however the loop ends, no worker process outlives it, even while the error, whose
    traceback holds the DataLoader's iterator in a reference cycle, is still alive (in torch's own iterator the
    workers of a worker error live until the garbage collector runs)."""
    import multiprocessing

    from dsrb._loader import batches

    before = set(multiprocessing.active_children())
    loader = torch.utils.data.DataLoader(_FailsAt(5 if end == "worker error" else -1), batch_size=2, num_workers=2)
    seen, error = [], None
    try:
        for batch in batches(loader):
            assert set(multiprocessing.active_children()) - before  # the workers run
            seen += batch.tolist()
            if len(seen) == 4 and end != "exhausted":
                if end == "break":
                    break
                if end == "error in the loop":
                    raise KeyError("in the loop")
    except (ValueError, KeyError) as err:
        error = err
    assert (error is not None) == (end in ("worker error", "error in the loop"))
    if end == "worker error":
        assert "cannot read item 5" in str(error)
    assert seen == (list(range(8)) if end == "exhausted" else [0, 1, 2, 3])
    assert set(multiprocessing.active_children()) - before == set(), end


def test_batches_without_workers():
    from dsrb._loader import batches

    loader = torch.utils.data.DataLoader(_FailsAt(-1), batch_size=3)
    assert [b.tolist() for b in batches(loader)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [b.tolist() for b in batches(loader, 2)] == [[0, 1, 2], [3, 4, 5]]


def test_an_interrupt_while_the_workers_stop_reaches_the_loop():
    """A Ctrl-C that lands while ``batches`` stops the workers of a loop cut short propagates. After a ``break`` the
    generator was closed as garbage, where Python prints and drops the KeyboardInterrupt: the run went on. The
    training loops now stop with ``limit`` (the generator ends inside their ``next()``)."""
    from dsrb._loader import batches

    class Iterator:
        def __init__(self):
            self.n = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.n += 1
            return self.n

        def _shutdown_workers(self):  # what a DataLoader iterator with workers runs at the end
            raise KeyboardInterrupt

    class Loader:
        def __iter__(self):
            return Iterator()

    seen = []
    with pytest.raises(KeyboardInterrupt):
        for step, batch in enumerate(batches(Loader(), 3)):
            seen.append(batch)
    assert seen == [1, 2, 3]


def test_a_worker_dead_of_our_signal_as_the_workers_start_is_the_interrupt(monkeypatch):
    """A process group's SIGTERM that lands while the iterator starts its workers: ours is only remembered there, and
    a worker that died of it before torch set its handler is reported by torch's SIGCHLD handler as a RuntimeError
    from ``iter(loader)``. That ended a run with a traceback instead of its interrupted line (seen under load); it
    is the interrupt now. A worker's death without our signal is still the error."""
    from dsrb import _cli
    from dsrb._loader import batches

    class Loader:
        def __init__(self, signalled):
            self.signalled = signalled

        def __iter__(self):
            if self.signalled:
                monkeypatch.setattr(_cli, "_TERMINATED", True)  # what the deferred handler does
            raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Terminated. ")

    monkeypatch.setattr(_cli, "_TERMINATED", False)
    with pytest.raises(RuntimeError, match=r"^DataLoader worker \(pid 12345\) is killed by signal"):
        next(batches(Loader(signalled=False)))
    with pytest.raises(KeyboardInterrupt):
        next(batches(Loader(signalled=True)))


_SIGNAL_IN_A_LOOP = """
import os, signal, sys, torch
from dsrb._cli import stop_on_termination
from dsrb._loader import batches

# Python's own Ctrl-C handler, as in a terminal (a shell's background job, which may run this suite, ignores SIGINT)
signal.signal(signal.SIGINT, signal.default_int_handler)
stop_on_termination()
sig = getattr(signal, sys.argv[2])
if sys.argv[1] == "at fork":  # logging's at-fork callbacks run there: what a process-group signal can hit
    os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), sig))
elif sys.argv[1] == "handled by an earlier run":
    try:
        os.kill(os.getpid(), sig)
    except KeyboardInterrupt:
        pass
    stop_on_termination()  # the next run in this process
else:
    class Drops:
        def __del__(self):
            os.kill(os.getpid(), sig)
    Drops()
loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2, multiprocessing_context="fork")
seen = 0
try:
    for batch in batches(loader):
        seen += 1
except KeyboardInterrupt:
    sys.exit(f"interrupted after {seen} batches")
print(f"ended after {seen} batches")
"""


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="forks the loader's workers (POSIX)")
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("where", ["at fork", "in a __del__", "handled by an earlier run"])
def test_a_signal_whose_interrupt_python_drops_still_stops_the_loop(where, signame):
    """Python prints and drops an exception raised in an at-fork callback or a ``__del__``: a SIGTERM or Ctrl-C whose
    KeyboardInterrupt was raised there was lost, and the run trained on to its end (exit status 0). The signal is
    remembered and ``batches`` stops before the first batch; as the workers start it raises nothing at all. One
    that an earlier run in the process stopped on does not stop the next."""
    res = subprocess.run([sys.executable, "-c", _SIGNAL_IN_A_LOOP, where, signame], capture_output=True, text=True,
                         timeout=120)
    if where == "handled by an earlier run":
        assert res.returncode == 0 and res.stdout == "ended after 4 batches\n", (res.stdout, res.stderr)
        return
    assert res.returncode == 1 and res.stderr.endswith("interrupted after 0 batches\n"), (res.stdout, res.stderr)
    assert ("Exception ignored" in res.stderr) == (where == "in a __del__"), res.stderr

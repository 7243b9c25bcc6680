"""TFRecord integrity: CRCs, truncation, indexes (missing, stale, gzip), schema of records."""
from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest
from tfrecord import TFRecordWriter
from tfrecord.tools.tfrecord2idx import create_index

from datamodules.tfrecord import (TFRecordSegDataModule, encode_case, ensure_index, index_path_for, iter_records,
                                  iter_tfrecord_cases, masked_crc, write_tfrecord)
from datamodules.phantom import preprocessing_record
from datamodules.tools import main as tools_main
from dmhelpers import make_dm, phantom_cases
from trainer.errors import UserError


@pytest.fixture
def plain(tmp_path, data_files) -> str:
    """A private copy of the 2D plain TFRecord (6 cases) without its index."""
    path = str(tmp_path / "cases.tfrecord")
    shutil.copy(data_files["tfrecord", 2], path)
    return path


def _flip_byte(path: str, record: int, where: str = "payload") -> None:
    index = ensure_index(path)
    os.remove(index_path_for(path))
    offset, length = index[record]
    pos = offset + (length // 2 if where == "payload" else 3)
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x10]))


def test_masked_crc_matches_the_tfrecord_package():
    for data in (b"", b"x", os.urandom(1000)):
        assert masked_crc(data).to_bytes(4, "little") == TFRecordWriter.masked_crc(data)


def test_index_is_created_when_missing_and_matches_the_records(plain, tmp_path):
    assert not os.path.exists(index_path_for(plain))
    index = ensure_index(plain)
    assert os.path.exists(index_path_for(plain)) and len(index) == 6
    assert [(o, len(p) + 16) for _, o, p in iter_records(plain)] == [tuple(r) for r in index.tolist()]
    gz = str(tmp_path / "cases.tfrecord.gz")
    with open(plain, "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    gz_index = ensure_index(gz)  # tfrecord's create_index would give an empty index here
    assert np.array_equal(gz_index, index)


def test_flipped_payload_byte_names_file_and_record(plain):
    _flip_byte(plain, record=2)
    with pytest.raises(UserError, match=rf"{plain}: record 2 failed its CRC32C check"):
        make_dm(plain, 2)  # cache build reads every record
    with pytest.raises(UserError, match="record 2 failed its CRC32C"):
        make_dm(plain, 2, cache="never")  # random-access reader checks at setup too
    assert tools_main(["inspect", plain]) == 2


def test_flipped_byte_in_gzip_stream_and_in_length_field(plain, tmp_path):
    _flip_byte(plain, record=4, where="length")
    with pytest.raises(UserError, match="record 4 has a corrupted length field"):
        list(iter_records(plain))
    gz = str(tmp_path / "bad.tfrecord.gz")
    shutil.copy(plain, tmp_path / "raw")
    with open(tmp_path / "raw", "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    with pytest.raises(UserError, match=f"{gz}: record 4"):
        make_dm(gz, 2)


def test_corruption_after_setup_is_caught_on_read(plain):
    dm = make_dm(plain, 2, cache="never", lru_cases=1)
    _flip_byte(plain, record=dm.splits["train"][0])
    with pytest.raises(UserError, match="failed its CRC32C check"):
        list(dm.make_dataloader("train"))


def test_truncated_file(plain):
    size = os.path.getsize(plain)
    with open(plain, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(UserError, match=r"record 5 is truncated"):
        make_dm(plain, 2)  # index created by tfrecord from the truncated file
    os.remove(index_path_for(plain))
    with pytest.raises(UserError, match=r"record 5 is truncated"):
        list(iter_records(plain))


def test_truncated_gzip_file(tmp_path, data_files):
    gz = str(tmp_path / "cut.tfrecord.gz")
    data = open(data_files["tfrecord.gz", 2], "rb").read()
    open(gz, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"{gz}: record"):
        make_dm(gz, 2)


def test_stale_or_foreign_index_is_rejected(plain, tmp_path):
    ensure_index(plain)
    other = str(tmp_path / "other.tfrecord")
    write_tfrecord(other, phantom_cases(3), num_classes=5, class_names=["b", "l", "k", "s", "t"])
    shutil.copy(index_path_for(other), index_path_for(plain))  # someone else's index
    with pytest.raises(UserError, match=rf"index {index_path_for(plain)} does not match {plain}"):
        make_dm(plain, 2)
    with open(index_path_for(plain), "w") as f:
        f.write("garbage here\n")
    with pytest.raises(UserError, match="not a valid index"):
        make_dm(plain, 2)


def test_empty_gzip_index_from_the_tfrecord_package_is_rejected(tmp_path, data_files):
    gz = str(tmp_path / "x.tfrecord.gz")
    shutil.copy(data_files["tfrecord.gz", 2], gz)
    create_index(gz, index_path_for(gz))  # the package's own tool: an empty index for gzip
    assert os.path.getsize(index_path_for(gz)) == 0
    with pytest.raises(UserError, match="the index is empty; delete the index"):
        make_dm(gz, 2)
    os.remove(index_path_for(gz))
    assert len(make_dm(gz, 2).store.cases) == 6


def test_gzip_index_that_disagrees_with_the_stream(tmp_path, data_files):
    gz = str(tmp_path / "y.tfrecord.gz")
    shutil.copy(data_files["tfrecord.gz", 2], gz)
    index = ensure_index(gz)
    with open(index_path_for(gz), "w") as f:
        for o, n in index[:-1].tolist():  # one record missing from the index
            f.write(f"{o} {n}\n")
    with pytest.raises(UserError, match="the file has more records than the 5 the index lists"):
        make_dm(gz, 2)


def _write_examples(path, datums):
    w = TFRecordWriter(path)
    for d in datums:
        w.write(d)
    w.close()


def _good_datum(i=0, **changes):
    _, image, label, spacing = next(iter(phantom_cases(2)))
    d = encode_case(f"c{i}", image, label, spacing, 5, ["a", "b", "c", "d", "e"])
    d.update(changes)
    return d


def test_record_schema_errors(tmp_path):
    cases = [
        ({"label": None}, r"record 1 lacks features \['label'\]"),
        ({"label_shape": ([4, 32, 31], "int")}, r"record 1: label shape \[4, 32, 31\] does not match image shape"),
        ({"image": (b"\0" * 12, "byte")}, r"record 1: image has 12 bytes but shape"),
        ({"num_classes": (3, "int")}, r"record 1: class_names has 5 entries"),
    ]
    for change, message in cases:
        bad = _good_datum(1, **change)
        bad = {k: v for k, v in bad.items() if v is not None}
        path = str(tmp_path / f"bad{len(os.listdir(tmp_path))}.tfrecord")
        _write_examples(path, [_good_datum(0), bad])
        with pytest.raises(UserError, match=message):
            list(iter_tfrecord_cases([path]))


def test_labels_out_of_range_and_empty_file(tmp_path):
    _, image, label, spacing = next(iter(phantom_cases(2)))
    path = str(tmp_path / "range.tfrecord")
    _write_examples(path, [encode_case("c0", image, label, spacing, 3, ["a", "b", "c"])])  # labels go up to 4
    with pytest.raises(UserError, match=r"label value 4 is out of range \[0, 3\)"):
        make_dm(path, 2, val_fraction=0.0)
    empty = str(tmp_path / "empty.tfrecord")
    open(empty, "wb").close()
    with pytest.raises(UserError, match="contains no records"):
        TFRecordSegDataModule(empty, 2, [16, 16])


def test_generate_writes_tfrecord_and_shards_from_a_directory(tmp_path):
    path = str(tmp_path / "shards" / "phantom.tfrecord.gz")
    dm = make_dm(path, 2, generate={"cases": 3, "shape": [4, 32, 32]}, val_fraction=0.0)
    assert os.path.exists(path) and os.path.exists(index_path_for(path)) and len(dm.store.cases) == 3
    more = str(tmp_path / "shards" / "more.tfrecord")
    names = ["background", "liver", "kidney", "spleen", "lesion"]
    write_tfrecord(more, phantom_cases(2), num_classes=5, class_names=names)  # no preprocessing record
    with pytest.raises(UserError, match="another preprocessing record than earlier records"):
        make_dm(str(tmp_path / "shards"), 2, val_fraction=0.0)
    write_tfrecord(more, phantom_cases(2), num_classes=5, class_names=names, preprocessing=preprocessing_record())
    both = make_dm(str(tmp_path / "shards"), 2, val_fraction=0.0)
    assert len(both.store.cases) == 9
    globbed = make_dm(str(tmp_path / "shards" / "*.tfrecord*"), 2, val_fraction=0.0)
    assert [c.case_id for c in globbed.store.cases] == [c.case_id for c in both.store.cases]

"""Pre-tokenized columns with unusable ids (issue 26 item 5): an unsigned id too large for any vocabulary (even
for int64), an id past the tokenizer's vocabulary, a null id, and the `<|mask|>` id (reserved for the meta
step) are each one DataError naming the file, row, position and id; usable ids pack as before."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metalm.data import DataError
from metalm.data.prepare import prepare
from metalm.data.sources import TokenRules, iter_documents

KW = dict(val_fraction=0.0, samples_per_shard=30, num_proc=1, progress=False)


@pytest.fixture(scope="module")
def tok_path(shared_data) -> str:
    return str(shared_data / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json")


def _parquet(path, rows, typ) -> str:
    pq.write_table(pa.table({"input_ids": pa.array(rows, type=pa.list_(typ))}), path, row_group_size=2)
    return str(path)


@pytest.mark.parametrize("typ", [pa.uint64(), pa.int64()])
def test_an_id_too_large_for_int64_is_one_line_naming_file_row_and_value(tok_path, tmp_path, typ):
    big = 2**64 - 1 if typ == pa.uint64() else 2**63 - 1
    src = _parquet(tmp_path / "ids.parquet", [[1, 2, 3], [4, 5], [6, 7], [8, big, 9]], typ)
    with pytest.raises(DataError) as e:
        prepare(src, tok_path, tmp_path / "out", 4, **KW)
    assert str(e.value) == (f"{src}: row 3: column 'input_ids' position 1: token id {big} is outside the "
                            f"tokenizer's vocabulary [0, 50281)")


def test_the_mask_id_in_pretokenized_input_is_refused(tok_path, tmp_path):
    src = _parquet(tmp_path / "ids.parquet", [[1, 2, 3], [4, 50280, 5]], pa.uint16())
    with pytest.raises(DataError, match=r"ids\.parquet: row 1: column 'input_ids' position 1: token id 50280 is "
                                        r"<\|mask\|>, which metalm reserves for the positions the meta step masks"):
        prepare(src, tok_path, tmp_path / "out", 4, **KW)


def test_null_ids_and_rows_and_negative_ids_name_the_row(tmp_path):
    rules = TokenRules(100, {99: "<|mask|>"})
    cases = [([[1, 2], [3, None]], pa.int32(), "row 1: column 'input_ids' position 1: is null, expected a token id"),
             ([[1, 2], None], pa.int32(), "row 1: column 'input_ids' is null"),
             ([[1], [2], [3, -4]], pa.int8(), "row 2: column 'input_ids' position 1: token id -4 is outside"),
             ([[1], [2], [3, 100]], pa.int8(), "row 2: column 'input_ids' position 1: token id 100 is outside the "
                                               "tokenizer's vocabulary [0, 100)")]
    for i, (rows, typ, expected) in enumerate(cases):
        src = _parquet(tmp_path / f"c{i}.parquet", rows, typ)
        with pytest.raises(DataError, match=r"c\d\.parquet: ") as e:
            list(iter_documents(src, rules=rules))
        assert expected in str(e.value) and "\n" not in str(e.value)
    ok = [[0, 1, 98], [2], []]
    assert list(iter_documents(_parquet(tmp_path / "ok.parquet", ok, pa.uint32()), rules=rules)) == ok

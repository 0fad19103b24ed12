"""The slot layout: which leaves batch into arrays, and which values a leaf takes."""

from __future__ import annotations

import numpy as np
import pytest
from sources_for_tests import Records

import agnostic_prefetch as ap


def load(records, batch_size=None, **kwargs):
    """Every batch of ``records``, one column per label; workers=0 unless given."""
    kwargs.setdefault("workers", 0)
    with ap.Loader(Records(records), batch_size or len(records), **kwargs) as loader:
        return list(loader)


def refusal(records, **kwargs) -> str:
    """The message of the LayoutError behind loading ``records``."""
    with pytest.raises(ap.WorkerError) as info:
        load(records, **kwargs)
    assert isinstance(info.value.__cause__, ap.LayoutError)
    return str(info.value.__cause__)


def test_python_scalar_leaves_are_laid_out_as_numpys_wide_dtypes():
    records = [{"i": 3, "x": 0.5, "b": True, "c": 1j}, {"i": 2**40, "x": 1e300, "b": False, "c": 2.0}]
    (batch,) = load(records)
    assert {k: str(v.dtype) for k, v in batch.items()} == {
        "i": "int64", "x": "float64", "b": "bool", "c": "complex128"}
    assert batch["i"].tolist() == [3, 2**40] and batch["x"].tolist() == [0.5, 1e300]


def test_a_numpy_scalar_leaf_takes_later_values_of_other_dtypes_that_it_holds_exactly():
    records = [{"label": np.int16(3)}, {"label": 40}, {"label": np.uint8(200)},
               {"label": np.int64(-32768)}, {"label": True}]
    (batch,) = load(records)
    assert batch["label"].dtype == np.int16
    assert batch["label"].tolist() == [3, 40, 200, -32768, 1]


def test_an_integer_out_of_a_scalar_leafs_range_is_refused_naming_record_leaf_value_and_remedy():
    message = refusal([{"label": np.int16(3)}, {"label": 40000}])
    assert "record 1" in message and "['label']" in message
    assert "40000" in message and "int16" in message and "-32768..32767" in message
    assert "wider dtype" in message and "spec=" in message


def test_a_negative_integer_in_an_unsigned_leaf_is_refused():
    message = refusal([{"label": np.uint8(3)}, {"label": 2}, {"label": -1}])
    assert "record 2" in message and "-1" in message and "uint8" in message


def test_an_unsigned_integer_beyond_a_signed_leaf_is_refused():
    message = refusal([{"label": 3}, {"label": np.uint64(2**63)}])
    assert "record 1" in message and str(2**63) in message and "int64" in message


def test_a_finite_float_that_would_become_inf_is_refused():
    message = refusal([{"w": np.float16(1.0)}, {"w": 1e6}])
    assert "record 1" in message and "1000000.0" in message and "float16" in message
    assert "65504" in message


def test_a_float_leaf_rounds_a_wider_float_to_its_precision_and_keeps_inf_and_nan():
    (batch,) = load([{"w": np.float32(0.5)}, {"w": 0.1}, {"w": float("inf")}, {"w": float("nan")}])
    assert batch["w"].dtype == np.float32
    assert batch["w"][:3].tolist() == [0.5, float(np.float32(0.1)), float("inf")]
    assert np.isnan(batch["w"][3])


def test_a_float_value_in_an_integer_leaf_is_refused_even_when_whole():
    message = refusal([{"label": 3}, {"label": 4.0}])
    assert "record 1" in message and "4.0" in message and "float64" in message and "int64" in message


def test_an_integer_in_a_bool_leaf_is_refused():
    message = refusal([{"keep": True}, {"keep": 1}])
    assert "record 1" in message and "bool" in message


def test_a_refused_scalar_in_a_process_worker_names_the_record():
    records = [{"label": np.int8(1)}] * 3 + [{"label": 300}]
    message = refusal(records, batch_size=2, workers=1)
    assert "record 3" in message and "300" in message and "int8" in message


def test_arrays_still_need_the_layouts_dtype_exactly():
    message = refusal([{"x": np.zeros(2, np.int16)}, {"x": np.zeros(2, np.int8)}])
    assert "record 1" in message and "int8[2]" in message and "int16[2]" in message


def test_bfloat16_and_float8_arrays_and_scalars_batch_into_one_array_each():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16, f8 = np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn)
    records = [{"x": np.full(3, i, bf16), "w": bf16.type(i / 2), "q": np.full((2, 2), i, f8)}
               for i in range(4)]
    (batch,) = load(records)
    assert isinstance(batch["x"], np.ndarray) and batch["x"].dtype == bf16
    assert batch["x"].shape == (4, 3) and batch["x"][:, 0].astype(np.float32).tolist() == [0, 1, 2, 3]
    assert batch["w"].dtype == bf16 and batch["w"].astype(np.float32).tolist() == [0, 0.5, 1, 1.5]
    assert batch["q"].dtype == f8 and batch["q"].shape == (4, 2, 2)


def test_bfloat16_leaves_batch_in_process_workers_which_import_ml_dtypes_to_unpickle_them():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    records = [{"x": np.full(2, i, bf16), "w": bf16.type(i)} for i in range(5)]
    batches = load(records, batch_size=2, workers=1, remainder="pad")
    assert [b["x"].dtype for b in batches] == [bf16] * 3
    assert np.concatenate([b["x"][:, 1] for b in batches]).astype(np.float32).tolist() == [0, 1, 2, 3, 4, 0]
    assert np.concatenate([b["w"] for b in batches]).astype(np.float32).tolist() == [0, 1, 2, 3, 4, 0]


def test_a_bfloat16_spec_lays_out_an_array_leaf_like_a_record_would():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    records = [{"x": np.full(2, i, bf16)} for i in range(3)]
    (batch,) = load(records, spec={"x": np.zeros(2, bf16)})
    assert batch["x"].dtype == bf16 and batch["x"].shape == (3, 2)


def test_a_float8_leaf_refuses_a_value_beyond_its_range_and_an_inf_it_has_no_code_for():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    f8 = np.dtype(ml_dtypes.float8_e4m3fn)
    message = refusal([{"w": f8.type(1)}, {"w": 448.0}, {"w": 1000.0}])
    assert "record 2" in message and "float8_e4m3fn holds finite values up to ±448" in message
    message = refusal([{"w": f8.type(1)}, {"w": float("inf")}])
    assert "record 1" in message and "float8_e4m3fn has no inf" in message


def test_structured_dtype_leaves_arrive_as_lists_of_their_values():
    pair = np.dtype([("a", np.int32), ("b", np.float32)])
    records = [{"p": np.array((i, i / 2), pair)} for i in range(3)]
    (batch,) = load(records)
    assert isinstance(batch["p"], list) and [p["a"] for p in batch["p"]] == [0, 1, 2]


def test_a_python_int_beyond_64_bits_arrives_as_a_list():
    (batch,) = load([{"big": 2**70 + i} for i in range(2)])
    assert batch["big"] == [2**70, 2**70 + 1]

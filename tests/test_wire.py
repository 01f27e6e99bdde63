"""The data plane's wire format: limits, row codecs and the binary rows page."""

from __future__ import annotations

import pytest

from shardkeeper.wire import (
    MAX_KEY_BYTES,
    MAX_LSN,
    MAX_VALUE_BYTES,
    Malformed,
    MalformedPage,
    Oversized,
    Row,
    b64,
    check_row,
    decode_rows_page,
    encode_rows_page,
    key_path,
    row_from_json,
    row_to_json,
)


def test_size_bounds():
    check_row(Row(b"k" * MAX_KEY_BYTES, b"v" * MAX_VALUE_BYTES, 1))
    with pytest.raises(Oversized):
        check_row(Row(b"k" * (MAX_KEY_BYTES + 1), b"v", 1))
    with pytest.raises(Oversized):
        check_row(Row(b"k", b"v" * (MAX_VALUE_BYTES + 1), 1))
    with pytest.raises(Malformed) as empty:
        check_row(Row(b"", b"v", 1))
    assert not isinstance(empty.value, Oversized) and empty.value.status == 400
    for lsn in (0, MAX_LSN + 1):  # SQLite could not store the latter
        with pytest.raises(Malformed):
            check_row(Row(b"k", b"v", lsn))
    check_row(Row(b"k", b"v", MAX_LSN))


def test_rows_round_trip_through_json_and_garbage_is_malformed():
    for row in (Row(b"\x00k/ey", b"\xffvalue", 7), Row(b"gone", None, 8)):
        assert row_from_json(row_to_json(row)) == row
    for bad in ([], {"key": b64(b"k"), "value": None}, {"key": "***", "lsn": 1},
                {"key": b64(b"k"), "value": None, "lsn": True}):
        with pytest.raises(Malformed):
            row_from_json(bad)
    with pytest.raises(Oversized):
        row_from_json(row_to_json(Row(b"k" * (MAX_KEY_BYTES + 1), b"v", 1)))


def test_keys_are_percent_encoded_in_paths():
    assert key_path(3, b"a/b c\xff") == "/v1/shards/3/keys/a%2Fb%20c%FF"


def test_rows_pages_round_trip_and_reject_garbage():
    entries = [(b"a", b"1", 3, 0), (b"b", None, 4, 1), (b"c", b"", 9, 0)]
    data = encode_rows_page(entries, 12, True)
    assert decode_rows_page(data) == (entries, 12, True)
    assert decode_rows_page(encode_rows_page([], 0, False)) == ([], 0, False)
    huge_key = encode_rows_page([(b"k" * (MAX_KEY_BYTES + 1), b"v", 1, 0)], 1, True)
    zero_lsn = encode_rows_page([(b"k", b"v", 0, 0)], 1, True)
    huge_lsn = encode_rows_page([(b"k", b"v", MAX_LSN + 1, 0)], 1, True)
    for bad in (data[:-1], data + b"x", b"JUNK" + data[4:], data[:5], huge_key, zero_lsn,
                huge_lsn):
        with pytest.raises(MalformedPage):
            decode_rows_page(bad)

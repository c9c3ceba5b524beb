"""The compact columns of :mod:`medssl.data.compact` against plain Python references (a list, a dict), and the
cache index that rides on them: what goes in comes out, in bytes close to the data itself."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medssl.data.compact import DuplicateKeyError, StringColumn, StringMap, ValueColumn, sorted_pairs

# any str, including the lone surrogates os.walk gives for file names the file system cannot decode
TEXT = st.text(alphabet=st.characters(codec=None), max_size=12) | st.sampled_from(["", "\udcff", "a/b.png", "é"])


@settings(max_examples=60, deadline=None)
@given(st.lists(TEXT, max_size=40))
def test_a_string_column_gives_back_the_strings_appended(values):
    column = StringColumn(values)
    assert len(column) == len(values)
    assert list(column) == values and [column[i] for i in range(len(values))] == values
    if values:
        assert column[-1] == values[-1] and column[1:3] == values[1:3]
    with pytest.raises(IndexError):
        column[len(values)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([(1, 2), (1.0, 2.0), "MR", "CT", "", (64, 64)]), max_size=40))
def test_a_value_column_gives_back_equal_values_as_one_object(values):
    column = ValueColumn(values)
    assert len(column) == len(values) and list(column) == values
    assert [column[i] for i in range(len(values))] == values and column[2:5] == values[2:5]
    assert len({id(v) for v in column}) == len(column.distinct()) <= 6


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(TEXT, TEXT, max_size=40), st.booleans())
def test_a_string_map_is_the_dict_of_its_pairs(reference, in_order):
    pairs = sorted(reference.items()) if in_order else list(reference.items())[::-1]
    mapping = StringMap.from_pairs(pairs)
    assert dict(mapping) == reference and len(mapping) == len(reference)
    assert list(mapping) == sorted(reference) and list(mapping.items()) == sorted(reference.items())
    assert list(sorted_pairs(mapping)) == list(sorted_pairs(reference)) == sorted(reference.items())
    for key, value in reference.items():
        assert key in mapping and mapping[key] == value and mapping.get(key) == value
    for missing in ("\x00never", "zzz\uffff"):
        if missing not in reference:
            assert missing not in mapping and mapping.get(missing) is None
            with pytest.raises(KeyError):
                mapping[missing]
    assert 3 not in mapping


@pytest.mark.parametrize("pairs", [[("a", "1"), ("a", "2")], [("b", "1"), ("a", "2"), ("b", "1")]])
def test_a_string_map_refuses_a_key_given_twice(pairs):
    with pytest.raises(DuplicateKeyError) as raised:
        StringMap.from_pairs(pairs)
    assert raised.value.args[0] in {"a", "b"}


def test_columns_hold_about_their_bytes():
    paths = [f"site{i // 500:02d}/patient{i // 20:06d}/study{i % 2}/image{i % 10:02d}.png" for i in range(10_000)]
    column = StringColumn(paths)
    assert column.nbytes == sum(len(p) for p in paths) + 4 * len(paths)  # 4-byte offsets under 4 GiB
    mapping = StringMap.from_pairs((f"p{i:019x}", p) for i, p in enumerate(paths))
    assert mapping.nbytes < 100 * len(paths)  # a dict of the same pairs: ~250 bytes a pair


def test_codes_and_offsets_take_the_smallest_type_that_holds_them():
    from array import array

    from medssl.data.compact import _widened

    assert _widened(array("B", [1, 2]), 255).typecode == "B"
    for value, code in ((256, "H"), (70_000, "I"), (2**40, "Q")):
        widened = _widened(array("B", [1, 2]), value)
        assert widened.typecode == code and list(widened) == [1, 2]
    values = [*range(70_000), 5, 300, 69_999]
    column = ValueColumn(values)
    assert list(column) == values and column[-1] == 69_999 and column._codes.itemsize == 4
    assert ValueColumn(["MR", "CT"] * 100)._codes.itemsize == 1


def _root_escape_by_pathlib(relative: str, windows: bool) -> str | None:
    """The reference: what pathlib's pure paths say (the implementation before root_escape worked on strings), by
    Windows' rules or by POSIX's."""
    from pathlib import PurePosixPath, PureWindowsPath

    posix = PurePosixPath(relative)
    if not windows:
        if posix.is_absolute():
            return "an absolute path"
        return "a path with a '..' component" if ".." in posix.parts else None
    as_windows = PureWindowsPath(relative)
    if posix.is_absolute() or as_windows.drive or as_windows.root:
        return "an absolute path"
    if ".." in as_windows.parts:
        return "a path with a '..' component"
    return None


@settings(max_examples=400, deadline=None)
@given(
    st.text(alphabet="/\\.:aC?é ", max_size=10) | st.sampled_from(["", "..", "C:", "a/..", "\\\\s\\x", "//s/x"]),
    st.booleans(),
)
def test_root_escape_on_strings_says_what_pathlib_says(relative, windows):
    from medssl.data.pathmap import root_escape

    assert root_escape(relative, windows=windows) == _root_escape_by_pathlib(relative, windows)

"""Compact columns: many short strings, or a few values repeated many times, held in a handful of arrays.

A Python ``str`` costs about 50 bytes plus its characters, a dataclass instance several hundred: a manifest of
100,000 rows held as row objects takes about 50 MB, a path map as a ``dict`` about 25 MB. These columns hold the same
values in bytes a row close to the data itself (a string's UTF-8 bytes plus an 8-byte offset; a repeated value a
4-byte code), and give them back as ordinary Python values on access, one at a time.

Strings are stored with ``surrogatepass``: any ``str`` round-trips, including file names that the file system
could not decode (``os.walk`` gives them lone surrogates).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Hashable, ItemsView, Iterable, Iterator, Mapping, Sequence
from itertools import pairwise
from typing import Generic, TypeVar, overload

_ENCODING = "utf-8"
_ERRORS = "surrogatepass"

_V = TypeVar("_V", bound=Hashable)


def _widened(values: array, value: int) -> array:
    """``values`` in the smallest of the unsigned array types ``B``, ``H``, ``I``, ``Q`` that also holds ``value``
    (``values`` itself while it does: a copy only when a value outgrows the type, a few times in a column's life)."""
    if value < 1 << (8 * values.itemsize):
        return values
    for code in "BHIQ":
        if value < 1 << (8 * array(code).itemsize):
            return array(code, values)
    raise OverflowError(f"{value} does not fit 64 bits")


class StringColumn(Sequence[str]):
    """An append-only sequence of strings as one UTF-8 buffer and the end offset of each (``[N]``, 4 bytes each while
    the buffer is under 4 GiB)."""

    __slots__ = ("_blob", "_ends")

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._blob = bytearray()
        self._ends = array("I")
        for value in values:
            self.append(value)

    def append(self, value: str) -> None:
        self._blob += value.encode(_ENCODING, _ERRORS)
        self._ends = _widened(self._ends, len(self._blob))
        self._ends.append(len(self._blob))

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        size = len(self._ends)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError("StringColumn index out of range")
        start = self._ends[index - 1] if index else 0
        return self._blob[start : self._ends[index]].decode(_ENCODING, _ERRORS)

    def __iter__(self) -> Iterator[str]:
        blob, start = self._blob, 0
        for end in self._ends:
            yield blob[start:end].decode(_ENCODING, _ERRORS)
            start = end

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffer and the offsets (not counting spare capacity)."""
        return len(self._blob) + self._ends.itemsize * len(self._ends)


class ValueColumn(Sequence[_V], Generic[_V]):
    """An append-only sequence of hashable values that repeat: one object per distinct value and a code a row
    (``[N]``: 1 byte while there are at most 256 distinct values, 2 up to 65536, then 4). Equal values are one
    value: the first one appended is what every equal one reads back."""

    __slots__ = ("_codes", "_lookup", "_values")

    def __init__(self, values: Iterable[_V] = ()) -> None:
        self._values: list[_V] = []
        self._lookup: dict[_V, int] = {}
        self._codes = array("B")
        for value in values:
            self.append(value)

    def append(self, value: _V) -> None:
        code = self._lookup.get(value)
        if code is None:
            code = self._lookup[value] = len(self._values)
            self._values.append(value)
            self._codes = _widened(self._codes, code)
        self._codes.append(code)

    def __len__(self) -> int:
        return len(self._codes)

    @overload
    def __getitem__(self, index: int) -> _V: ...

    @overload
    def __getitem__(self, index: slice) -> list[_V]: ...

    def __getitem__(self, index: int | slice) -> _V | list[_V]:
        if isinstance(index, slice):
            return [self._values[code] for code in self._codes[index]]
        return self._values[self._codes[index]]

    def __iter__(self) -> Iterator[_V]:
        values = self._values
        for code in self._codes:
            yield values[code]

    def distinct(self) -> list[_V]:
        """The distinct values, in the order they first came."""
        return list(self._values)


class DuplicateKeyError(KeyError):
    """A :class:`StringMap` was given one key twice (``args[0]``: the key)."""


class StringMap(Mapping[str, str]):
    """``key -> value`` for many string pairs, held as two :class:`StringColumn` sorted by key; a lookup is a binary
    search (``log2 N`` string decodes). About the pairs' UTF-8 bytes plus 16 bytes a pair, against some 200 in a
    ``dict``.

    Build it with :meth:`from_pairs`: pairs that come sorted by key (a path map as written) are appended as they come;
    otherwise they are sorted once at the end, which holds a list of the keys for the time of the sort.
    """

    __slots__ = ("_keys", "_values")

    def __init__(self, keys: StringColumn, values: StringColumn) -> None:
        """``keys`` sorted, distinct, and as many as ``values`` (use :meth:`from_pairs` unless they are)."""
        if len(keys) != len(values):
            raise ValueError(f"StringMap: {len(keys)} keys but {len(values)} values")
        self._keys = keys
        self._values = values

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> StringMap:
        """The map of ``pairs``.

        Raises:
            DuplicateKeyError: a key comes twice; ``args[0]`` is the key.
        """
        keys, values = StringColumn(), StringColumn()
        last: str | None = None
        in_order = True
        for key, value in pairs:
            if last is not None and key <= last:
                if key == last:
                    raise DuplicateKeyError(key)
                in_order = False
            keys.append(key)
            values.append(value)
            last = key
        if in_order:
            return cls(keys, values)
        order = sorted(range(len(keys)), key=keys.__getitem__)
        for first, second in pairwise(order):
            if keys[first] == keys[second]:
                raise DuplicateKeyError(keys[first])
        return cls(StringColumn(keys[i] for i in order), StringColumn(values[i] for i in order))

    def _find(self, key: object) -> int:
        """The position of ``key``, or -1."""
        if not isinstance(key, str):
            return -1
        i = bisect_left(self._keys, key)
        return i if i < len(self._keys) and self._keys[i] == key else -1

    def __getitem__(self, key: str) -> str:
        i = self._find(key)
        if i < 0:
            raise KeyError(key)
        return self._values[i]

    def __contains__(self, key: object) -> bool:
        return self._find(key) >= 0

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def items(self) -> ItemsView[str, str]:
        """The pairs in key order, read side by side (not one lookup per key)."""
        return _PairsView(self)

    def pairs(self) -> Iterator[tuple[str, str]]:
        """``(key, value)`` in key order."""
        return zip(self._keys, self._values, strict=True)

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._values.nbytes


class _PairsView(ItemsView[str, str]):
    _mapping: StringMap

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return self._mapping.pairs()


def sorted_pairs(mapping: Mapping[str, str] | object) -> Iterable[tuple[str, str]]:
    """``mapping``'s pairs in key order: a :class:`StringMap`'s (or anything with such a ``pairs()``) as they are
    held, another mapping's sorted."""
    pairs = getattr(mapping, "pairs", None)
    if pairs is not None:
        return pairs()  # type: ignore[no-any-return]
    assert isinstance(mapping, Mapping)
    return ((key, mapping[key]) for key in sorted(mapping))

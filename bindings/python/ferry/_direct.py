"""The hot calls — ``select`` and ``exec`` with packed parameters — made with one ctypes call.

A generated UniFFI method lowers each string argument through a buffer builder that allocates
and then grows a Rust buffer (separate calls into the library), clones the object's handle
through another wrapper, checks the call's status in Python and frees the result with one
more: about seven ctypes round trips and a few dozen Python frames for one query, most of a
point read's cost (``docs/benchmarks.md``). The library also exports these calls as plain C
functions (``bindings/ffi/src/fast.rs``): the object's handle is cloned for the call, which
consumes it (as a generated method does), the statement and its packed parameters go as one
byte string, and the result is written into a buffer kept per thread.
The object's own handle is lent for the call (the ``BORROWED`` target: the library takes and
releases a reference of its own; the object is an argument of the calling frame, so it and its
handle outlive the call), which saves the generated ``clone`` call.
A query answers in the form ``marshal.loads`` reads (``bindings/ffi/src/marshal.rs``): the
C-speed ``(column_names, row_tuples)``, with no JSON to scan. ``marshal``'s format is
CPython's own, so at import this module reads a sample the library's tests pin byte for byte,
and falls back to packed JSON if this Python reads it differently.
A failure is raised by the generated ``fast_call_error()``, so it is the same typed
``FerryError`` as from the generated methods.

It uses the generated module's library handle and an object's ``_handle``, both of the exact
``uniffi`` version pinned in the workspace; the test suite runs every call through here.
"""

from __future__ import annotations

import ctypes
import marshal
import threading
import typing

from .ferry_ffi import ferry_ffi as _g
from .ferry_ffi import Replica, WriteTransaction, fast_call_error

_OK, _MORE = 0, 1
_PACKED, _MARSHAL = 0, 2
# A result up to this long lands in the thread's buffer; a longer one is fetched in a second call.
_CAP = 64 * 1024

# The same library (dlopen hands back the loaded one) through function objects of our own.
_own = ctypes.CDLL(_g._UniffiLib._name)
_u32 = ctypes.c_uint32
_IN = (ctypes.c_uint64, ctypes.c_uint8, ctypes.c_char_p, _u32, _u32, ctypes.c_uint8)
_REPLICA, _TRANSACTION = 0, 1  # what a handle is (fast.rs)
_BORROWED = 0x80  # added to a target: the handle is lent for the call, not cloned for it

# What marshal.rs writes for (("a",), [(None, -2, 1 << 40, -(1 << 63), 0.5, "é", b"\x01\x02")]),
# pinned byte for byte by its test `the_sample_the_python_binding_checks_at_import`.
_SAMPLE = (
    b"(\x02\x00\x00\x00(\x01\x00\x00\x00u\x01\x00\x00\x00a[\x01\x00\x00\x00(\x07\x00\x00\x00N"
    b"i\xfe\xff\xff\xffl\x03\x00\x00\x00\x00\x00\x00\x00\x00\x04l\xfb\xff\xff\xff\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x08\x00g\x00\x00\x00\x00\x00\x00\xe0?u\x02\x00\x00\x00\xc3\xa9s\x02\x00"
    b"\x00\x00\x01\x02"
)


def _reads_marshal() -> bool:
    try:
        got = marshal.loads(_SAMPLE)
    except (ValueError, EOFError, TypeError):
        return False
    expected = (("a",), [(None, -2, 1 << 40, -(1 << 63), 0.5, "é", b"\x01\x02")])
    return bool(got == expected and type(got[1]) is list and type(got[1][0]) is tuple)


# Whether query results come as marshal (else packed JSON, read by the caller's decoder).
MARSHALLED = _reads_marshal()


def _function(name: str, *rest: typing.Any) -> typing.Any:
    f = getattr(_own, name)
    f.argtypes = _IN + rest
    f.restype = ctypes.c_int32
    return f


_QUERY = _function("ferry_fast_query", ctypes.c_void_p, _u32, ctypes.POINTER(_u32))
_EXEC = _function("ferry_fast_execute", ctypes.POINTER(ctypes.c_int64))
_take = _own.ferry_fast_take
_take.argtypes = (ctypes.c_void_p, _u32)
_take.restype = _u32


class _Slot(threading.local):
    """This thread's result buffer and out-parameters (ctypes releases the GIL during a call,
    so threads cannot share them)."""

    def __init__(self) -> None:
        self.buf = ctypes.create_string_buffer(_CAP)
        self.len = _u32()
        self.len_ref = ctypes.byref(self.len)
        self.changed = ctypes.c_int64()
        self.changed_ref = ctypes.byref(self.changed)


_slot = _Slot()


def _failed() -> typing.NoReturn:
    fast_call_error()  # raises the call's FerryError
    raise RuntimeError("a fast call failed without saying why")


# The two calls below are written out in one frame each (no helper calls): at a point read's
# few microseconds, each Python call is a measurable part of the cost.


def _long(rc: int, slot: _Slot) -> bytes:
    """The answer of a call that did not return OK: a long result, or the call's error raised."""
    if rc == _MORE:
        n = slot.len.value
        big = ctypes.create_string_buffer(n)
        if _take(big, n) != n:
            raise RuntimeError("the fast call's long result went missing")
        return big.raw
    _failed()


def query(
    obj: typing.Union[Replica, WriteTransaction], sql: str, params: str
) -> typing.Union[typing.Tuple[typing.Tuple[str, ...], typing.List[typing.Tuple[typing.Any, ...]]], bytes]:
    """``obj.query_packed(sql, params)`` in one call: ``(column_names, row_tuples)`` when
    ``MARSHALLED``, else the packed JSON result as UTF-8 bytes."""
    data = (sql + params).encode("utf-8")  # the statement, then its parameters
    n = len(sql) if sql.isascii() else len(sql.encode("utf-8"))
    # obj's own handle, lent for the call.
    target = _TRANSACTION | _BORROWED if isinstance(obj, WriteTransaction) else _REPLICA | _BORROWED
    slot = _slot
    marshalled = MARSHALLED
    rc = _QUERY(
        obj._handle, target, data, n, len(data) - n, _MARSHAL if marshalled else _PACKED, slot.buf, _CAP, slot.len_ref
    )
    answer = ctypes.string_at(slot.buf, slot.len.value) if rc == _OK else _long(rc, slot)
    return typing.cast(typing.Any, marshal.loads(answer)) if marshalled else answer


def execute_packed(obj: typing.Union[Replica, WriteTransaction], sql: str, params: str) -> int:
    """``obj.execute_packed(sql, params)`` in one call."""
    data = (sql + params).encode("utf-8")
    n = len(sql) if sql.isascii() else len(sql.encode("utf-8"))
    target = _TRANSACTION | _BORROWED if isinstance(obj, WriteTransaction) else _REPLICA | _BORROWED
    slot = _slot
    if _EXEC(obj._handle, target, data, n, len(data) - n, _PACKED, slot.changed_ref) != _OK:
        _failed()
    return slot.changed.value

"""The hot calls — ``select`` and ``exec`` with packed parameters — made with one ctypes call.

A generated UniFFI method lowers each string argument through a buffer builder that allocates
and then grows a Rust buffer (separate calls into the library), clones the object's handle
through another wrapper, checks the call's status in Python and frees the result with one
more: about seven ctypes round trips and a few dozen Python frames for one query, most of a
point read's cost (``docs/benchmarks.md``). The library also exports these calls as plain C
functions (``bindings/ffi/src/fast.rs``): the object's handle is cloned for the call, which
consumes it (as a generated method does), the statement and its packed parameters go as one
byte string, and the result is written into a buffer kept per thread.
A failure is raised by the generated ``fast_call_error()``, so it is the same typed
``FerryError`` as from the generated methods.

It uses the generated module's library handle and an object's ``_handle``, both of the exact
``uniffi`` version pinned in the workspace; the test suite runs every call through here.
"""

from __future__ import annotations

import ctypes
import threading
import typing

from .ferry_ffi import ferry_ffi as _g
from .ferry_ffi import Replica, WriteTransaction, fast_call_error

_OK, _MORE = 0, 1
_PACKED = 0
# A result up to this long lands in the thread's buffer; a longer one is fetched in a second call.
_CAP = 64 * 1024

# The same library (dlopen hands back the loaded one) through function objects of our own.
_own = ctypes.CDLL(_g._UniffiLib._name)
_u32 = ctypes.c_uint32
_IN = (ctypes.c_uint64, ctypes.c_uint8, ctypes.c_char_p, _u32, _u32, ctypes.c_uint8)
_REPLICA, _TRANSACTION = 0, 1  # what a handle is (fast.rs)


def _function(name: str, *rest: typing.Any) -> typing.Any:
    f = getattr(_own, name)
    f.argtypes = _IN + rest
    f.restype = ctypes.c_int32
    return f


_QUERY = _function("ferry_fast_query", ctypes.c_void_p, _u32, ctypes.POINTER(_u32))
_EXEC = _function("ferry_fast_execute", ctypes.POINTER(ctypes.c_int64))
_CLONE_REPLICA = _g._UniffiLib.uniffi_ferry_ffi_fn_clone_replica
_CLONE_TX = _g._UniffiLib.uniffi_ferry_ffi_fn_clone_writetransaction
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
        self.status = _g._UniffiRustCallStatus()
        self.status_ref = ctypes.byref(self.status)


_slot = _Slot()


def _cloned(clone: typing.Any, obj: typing.Any, slot: _Slot) -> int:
    """A handle of ``obj`` for one call (the call consumes it)."""
    handle = clone(obj._handle, slot.status_ref)
    if slot.status.code:  # allocation failed: Rust panicked (out of memory)
        _g._uniffi_check_call_status(None, slot.status)
    return typing.cast(int, handle)


def _failed() -> typing.NoReturn:
    fast_call_error()  # raises the call's FerryError
    raise RuntimeError("a fast call failed without saying why")


def _target(obj: typing.Union[Replica, WriteTransaction], slot: _Slot) -> typing.Tuple[int, int]:
    """A handle of ``obj`` cloned for one call (the call consumes it), and what it is."""
    if isinstance(obj, WriteTransaction):
        return _cloned(_CLONE_TX, obj, slot), _TRANSACTION
    return _cloned(_CLONE_REPLICA, obj, slot), _REPLICA


def query_packed(obj: typing.Union[Replica, WriteTransaction], sql: str, params: str) -> bytes:
    """``obj.query_packed(sql, params)`` in one call; the packed result as UTF-8 bytes."""
    a = sql.encode("utf-8")
    b = params.encode("utf-8")
    slot = _slot
    handle, target = _target(obj, slot)
    rc = _QUERY(handle, target, a + b, len(a), len(b), _PACKED, slot.buf, _CAP, slot.len_ref)
    if rc == _OK:
        return ctypes.string_at(slot.buf, slot.len.value)
    if rc == _MORE:
        n = slot.len.value
        big = ctypes.create_string_buffer(n)
        if _take(big, n) != n:
            raise RuntimeError("the fast call's long result went missing")
        return big.raw
    _failed()


def execute_packed(obj: typing.Union[Replica, WriteTransaction], sql: str, params: str) -> int:
    """``obj.execute_packed(sql, params)`` in one call."""
    a = sql.encode("utf-8")
    b = params.encode("utf-8")
    slot = _slot
    handle, target = _target(obj, slot)
    if _EXEC(handle, target, a + b, len(a), len(b), _PACKED, slot.changed_ref) != _OK:
        _failed()
    return slot.changed.value

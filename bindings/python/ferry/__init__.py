"""Ferry for Python: an offline-first SQLite replica that syncs through a Ferry relay.

The classes come from the generated ``ferry_ffi`` module (UniFFI, over the Rust core). This
package adds a thin Pythonic layer on top:

* ``with Replica.open(...) as db:`` closes the database at the end;
* ``with db.transaction() as tx:`` commits, or rolls back if the block raises;
* ``db.exec(sql, params)`` / ``db.select(sql, params)`` take parameters as a sequence, as
  ``sqlite3`` does, and return plain Python values; rows are ``Row`` objects (tuples that also
  answer ``row["title"]`` and ``row.title``); ``db.select_as(Note, sql, params)`` builds a
  dataclass (or any class taking the columns as keyword arguments) per row;
  ``tx.exec_many(sql, rows)`` writes many rows in one call;
* ``await db.select_async(...)``, ``await db.exec_async(...)`` and ``await db.write_async(fn)``
  run on a worker thread, so an event loop never waits on Ferry's lock;
* ``db.watch_rows(sql, params)`` and ``session.statuses()`` are async iterators;
* ``db.sync_with(url, token)`` and ``db.resolve_with(table, fn)`` accept plain callables;
* ``ferry.use_logging()`` sends Ferry's log records to ``logging``; ``ferry.log_with(fn, level)``
  to any callable.

Everything Ferry raises is a ``FerryError`` subclass, one per action the app takes
(``FerryError.InvalidInput``, ``FerryError.Unauthorized``, ``FerryError.Offline``,
``FerryError.StorageFull``, ``FerryError.Closed``, ...; the table is in ``docs/bindings.md``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import math
import logging
import typing

from .ferry_ffi import *  # noqa: F401,F403  (the generated API is the public API)
from . import _direct
from .ferry_ffi import (
    ChangeListener,
    ConflictInput,
    ConflictRecord,
    ChangeEvent,
    ConflictResolver,
    FerryError,
    LogLevel,
    LogRecord,
    LogSink,
    QueryListener,
    QueryResult,
    Replica,
    Resolution,
    Schema,
    SqlValue,
    SyncOptions,
    SyncSession,
    SyncStatus,
    Subscription,
    SyncStatusListener,
    TokenProvider,
    WriteTransaction,
    schema_from_json,
    schema_to_json,
)

Py = typing.Union[None, int, float, str, bytes, bool]
Params = typing.Sequence[typing.Any]
AnyParams = typing.Union[Params, typing.Mapping[str, typing.Any]]
T = typing.TypeVar("T")


class Row(tuple):  # type: ignore[type-arg]
    """One result row: a tuple of Python values that also answers by column name, as
    ``row["title"]`` or ``row.title``; ``keys()`` lists the columns."""

    __slots__ = ()
    _index: typing.Dict[str, int]
    _names: typing.Tuple[str, ...]

    def __getitem__(self, key: typing.Any) -> typing.Any:  # type: ignore[override]
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._index[key])
            except KeyError:
                raise KeyError(f"no column {key!r}; columns: {', '.join(self._names)}") from None
        return tuple.__getitem__(self, key)

    def __getattr__(self, name: str) -> typing.Any:
        try:
            return tuple.__getitem__(self, self._index[name])
        except KeyError:
            raise AttributeError(f"no column {name!r}; columns: {', '.join(self._names)}") from None

    def keys(self) -> typing.List[str]:
        """The column names, in order."""
        return list(self._names)

    def as_dict(self) -> typing.Dict[str, typing.Any]:
        """The row as a dict of column name to value."""
        return dict(zip(self._names, self))

    def __repr__(self) -> str:
        return "Row(" + ", ".join(f"{k}={v!r}" for k, v in zip(self._names, self)) + ")"


@functools.lru_cache(maxsize=256)
def _row_class(names: typing.Tuple[str, ...]) -> typing.Type[Row]:
    """A Row subclass that knows these column names, shared by every result with the same
    columns (a few hundred kept: making a class costs more than a point read)."""
    index = {n: i for i, n in enumerate(names)}
    return type("Row", (Row,), {"__slots__": (), "_index": index, "_names": names})


def sql_value(v: typing.Union[Py, SqlValue]) -> SqlValue:
    """Converts a Python value (None, int, bool, float, str, bytes) to a SqlValue."""
    if v is None:
        return SqlValue.NULL()
    if isinstance(v, bool):
        return SqlValue.INTEGER(int(v))
    if isinstance(v, int):
        return SqlValue.INTEGER(v)
    if isinstance(v, float):
        return SqlValue.REAL(v)
    if isinstance(v, str):
        return SqlValue.TEXT(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return SqlValue.BLOB(bytes(v))
    if isinstance(v, (SqlValue.NULL, SqlValue.INTEGER, SqlValue.REAL, SqlValue.TEXT, SqlValue.BLOB)):
        return v
    raise TypeError(f"no SQLite value for {type(v).__name__}")


def py_value(v: SqlValue) -> Py:
    """The Python value inside a SqlValue."""
    if v.is_NULL():
        return None
    return v.value  # type: ignore[union-attr]


def rows(result: QueryResult) -> typing.List[Row]:
    """Query results as ``Row`` objects (tuples of Python values with column names)."""
    cls = _row_class(tuple(result.columns))
    return [cls(py_value(v) for v in row) for row in result.rows]


_NAMES: "collections.OrderedDict[str, typing.List[typing.Optional[str]]]" = collections.OrderedDict()
_NAMES_KEPT = 256


def _names(db: typing.Union[Replica, WriteTransaction], sql: str) -> typing.List[typing.Optional[str]]:
    """The statement's parameter names as SQLite parses them (a few hundred statements kept)."""
    names = _NAMES.get(sql)
    if names is None:
        names = db.parameter_names(sql)
        _NAMES[sql] = names
        if len(_NAMES) > _NAMES_KEPT:
            _NAMES.popitem(last=False)
    return names


def _positional(
    params: AnyParams, db: typing.Optional[typing.Union[Replica, WriteTransaction]], sql: str
) -> typing.Sequence[typing.Any]:
    """Parameters as ``sqlite3`` takes them — a sequence for ``?`` placeholders, or a mapping
    for named ones (``:id``, ``@id``, ``$id``; keys without the prefix) — in binding order."""
    if type(params) is tuple or type(params) is list:  # the common case, without ABC checks
        return params
    if isinstance(params, (str, bytes, bytearray)):
        raise TypeError("parameters are a sequence of values, e.g. (note_id,), not a single string")
    if isinstance(params, typing.Mapping):
        if db is None:
            raise TypeError("named parameters (a mapping) are not taken here: pass a sequence")
        values = []
        for i, name in enumerate(_names(db, sql), 1):
            if name is None:
                raise TypeError(f"parameter {i} is a `?` placeholder: pass a sequence, not a mapping")
            if name[1:] not in params:
                raise TypeError(f"no value for the named parameter {name}")
            values.append(params[name[1:]])
        return values
    return list(params)  # any other sequence, as a list the encoder takes


def _params(
    params: AnyParams, db: typing.Optional[typing.Union[Replica, WriteTransaction]] = None, sql: str = ""
) -> typing.List[SqlValue]:
    """The parameters as generated ``SqlValue`` records (see ``_positional``)."""
    return [sql_value(p) for p in _positional(params, db, sql)]


# The packed form (bindings/ffi/src/packed.rs): values cross the FFI as one JSON string each
# way, written and read by the C-accelerated json module, instead of UniFFI's per-value
# marshalling, which is pure Python.
def _packed_default(v: typing.Any) -> typing.Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"b": bytes(v).hex()}
    if isinstance(v, (SqlValue.NULL, SqlValue.INTEGER, SqlValue.REAL, SqlValue.TEXT, SqlValue.BLOB)):
        return py_value(v)
    raise TypeError(f"no SQLite value for {type(v).__name__}")


# json's C encoder and scanner, made once: `json.dumps`/`json.loads` build an encoder per call
# and run regular expressions around the scanner, which costs more than a point read.
_c_encoder = json.encoder.c_make_encoder  # type: ignore[attr-defined]
if _c_encoder is not None:
    _iterencode = _c_encoder(
        None, _packed_default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, False
    )

    def _packed_encode(values: typing.Any) -> str:
        return "".join(_iterencode(values, 0))

else:  # a Python without the C accelerator
    _packed_encode = json.JSONEncoder(default=_packed_default, allow_nan=False, separators=(",", ":")).encode
_scan = json.decoder.JSONDecoder().scan_once


def _special_float(v: typing.Any) -> typing.Any:
    if isinstance(v, float) and not math.isfinite(v):
        return {"f": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
    return v


def _pack(values: typing.Any) -> str:
    try:
        return _packed_encode(values)
    except ValueError:  # a non-finite float: JSON has none, so it is spelled out
        if values and isinstance(values[0], (list, tuple)):
            return _packed_encode([[_special_float(v) for v in r] for r in values])
        return _packed_encode([_special_float(v) for v in values])


def _unpack_value(v: typing.Any) -> typing.Any:
    if isinstance(v, dict):
        if "b" in v:
            return bytes.fromhex(v["b"])
        return float(v["f"])
    return v


def _unpack(packed: typing.Union[str, bytes]) -> typing.List[Row]:
    d = _scan(packed.decode("utf-8") if isinstance(packed, bytes) else packed, 0)[0]
    cls = _row_class(tuple(d["c"]))
    if d["x"]:
        return [cls(_unpack_value(v) for v in r) for r in d["r"]]
    return [cls(r) for r in d["r"]]


def _exec(self: typing.Union[Replica, WriteTransaction], sql: str, params: AnyParams = ()) -> int:
    """Runs one statement with Python values as parameters (a sequence, or a mapping for named
    parameters); returns rows changed."""
    return _direct.execute_packed(self, sql, _pack(_positional(params, self, sql)))


def _select(self: typing.Union[Replica, WriteTransaction], sql: str, params: AnyParams = ()) -> typing.List[Row]:
    """Runs a query with Python values as parameters (a sequence, or a mapping for named
    parameters); returns ``Row`` objects."""
    answer = _direct.query(self, sql, _pack(_positional(params, self, sql)))
    if type(answer) is tuple:  # marshalled: (column names, row tuples)
        cls = _row_class(answer[0])
        return list(map(cls, answer[1]))
    return _unpack(typing.cast(bytes, answer))


def _select_as(
    self: typing.Union[Replica, WriteTransaction], cls: typing.Callable[..., T], sql: str, params: AnyParams = ()
) -> typing.List[T]:
    """Runs a query and builds ``cls(**row)`` per row (a dataclass whose fields are the
    result's columns, or any class taking them as keyword arguments)."""
    return [cls(**r.as_dict()) for r in _select(self, sql, params)]


def _exec_many(self: WriteTransaction, sql: str, rows_: typing.Iterable[Params]) -> int:
    """Runs ``sql`` once per parameter row, in one call across the FFI; returns rows changed."""
    return self.execute_many_packed(sql, _pack([list(_positional(r, self, sql)) for r in rows_]))


@contextlib.contextmanager
def _transaction(self: Replica) -> typing.Iterator[WriteTransaction]:
    """One write transaction: committed when the block ends, rolled back if it raises."""
    tx = self.begin_write()
    try:
        yield tx
    except BaseException:
        with contextlib.suppress(FerryError):  # the block's exception is the one that matters
            tx.rollback()
        raise
    else:
        tx.commit()


async def _select_async(self: Replica, sql: str, params: AnyParams = ()) -> typing.List[Row]:
    """``select`` on a worker thread: the event loop goes on while the query runs."""
    return await asyncio.to_thread(_select, self, sql, params)


async def _exec_async(self: Replica, sql: str, params: AnyParams = ()) -> int:
    """``exec`` on a worker thread."""
    return await asyncio.to_thread(_exec, self, sql, params)


async def _write_async(self: Replica, body: typing.Callable[[WriteTransaction], T]) -> T:
    """Runs ``body(tx)`` in one write transaction on a worker thread: committed if it
    returns, rolled back if it raises. ``body`` is a plain function, so the transaction is
    never held open across an ``await``."""

    def run() -> T:
        with _transaction(self) as tx:
            return body(tx)

    return await asyncio.to_thread(run)


def log_with(fn: typing.Optional[typing.Callable[[LogRecord], None]], level: LogLevel = LogLevel.INFO) -> None:
    """Sends Ferry's log records at ``level`` and above to ``fn`` (called on Ferry's threads);
    ``None`` stops them."""
    if fn is None:
        set_logger(None, level)  # noqa: F405  (generated)
        return

    class Forward(LogSink):
        def log(self, record: LogRecord) -> None:
            fn(record)

    set_logger(Forward(), level)  # noqa: F405  (generated)


_PY_LEVELS = {
    LogLevel.ERROR: logging.ERROR,
    LogLevel.WARN: logging.WARNING,
    LogLevel.INFO: logging.INFO,
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.TRACE: logging.DEBUG,
}


def use_logging(logger: typing.Optional[logging.Logger] = None, level: LogLevel = LogLevel.INFO) -> None:
    """Sends Ferry's log records to Python's ``logging`` (the ``ferry`` logger by default),
    each under a child logger named after its Rust module (``ferry.ferry_core.sync``)."""
    base = logger or logging.getLogger("ferry")
    log_with(lambda r: base.getChild(r.target.replace("::", ".")).log(_PY_LEVELS[r.level], "%s", r.message), level)


class _Queue:
    """Hands values from Ferry's threads to an asyncio loop."""

    def __init__(self, latest_only: bool) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[typing.Any] = asyncio.Queue()
        self.latest_only = latest_only

    def put(self, item: typing.Any) -> None:
        def add() -> None:
            if self.latest_only:
                while not self.queue.empty():
                    self.queue.get_nowait()
            self.queue.put_nowait(item)

        self.loop.call_soon_threadsafe(add)


async def _iterate(
    subscribe: typing.Callable[[typing.Callable[[typing.Any], None]], Subscription], latest_only: bool
) -> typing.AsyncIterator[typing.Any]:
    """Yields what a Ferry listener receives (on Ferry's threads) on the caller's event loop;
    the subscription ends when the iteration does."""
    q = _Queue(latest_only)
    sub = subscribe(q.put)
    try:
        while True:
            yield await q.queue.get()
    finally:
        sub.cancel()


def _watch_rows(self: Replica, sql: str, params: AnyParams = ()) -> typing.AsyncIterator[typing.List[Row]]:
    """The results of ``sql`` now and after every commit that changes them (latest only)."""

    class Listener(QueryListener):
        def __init__(self, put: typing.Callable[[typing.Any], None]) -> None:
            self.put = put

        def on_rows(self, rows_: QueryResult) -> None:
            self.put(rows(rows_))

    return _iterate(lambda put: self.watch(sql, _params(params, self, sql), Listener(put)), latest_only=True)


def _changes(self: Replica) -> typing.AsyncIterator[ChangeEvent]:
    """Every commit to synced tables, none dropped."""

    class Listener(ChangeListener):
        def __init__(self, put: typing.Callable[[typing.Any], None]) -> None:
            self.put = put

        def on_change(self, event: ChangeEvent) -> None:
            self.put(event)

        def on_conflict(self, conflict: ConflictRecord) -> None:
            pass

    return _iterate(lambda put: self.subscribe(Listener(put)), latest_only=False)


def _conflict_records(self: Replica) -> typing.AsyncIterator[ConflictRecord]:
    """Every conflict detected while merging (conflict log entries as written), none dropped."""

    class Listener(ChangeListener):
        def __init__(self, put: typing.Callable[[typing.Any], None]) -> None:
            self.put = put

        def on_change(self, event: ChangeEvent) -> None:
            pass

        def on_conflict(self, conflict: ConflictRecord) -> None:
            self.put(conflict)

    return _iterate(lambda put: self.subscribe(Listener(put)), latest_only=False)


class _StatusListener(SyncStatusListener):
    def __init__(self, put: typing.Callable[[typing.Any], None]) -> None:
        self.put = put

    def on_status(self, status: SyncStatus) -> None:
        self.put(status)


def _statuses(self: SyncSession) -> typing.AsyncIterator[SyncStatus]:
    """The sync status now and on every change (latest only)."""
    return _iterate(lambda put: self.observe(_StatusListener(put)), latest_only=True)


def _replica_statuses(self: Replica) -> typing.AsyncIterator[SyncStatus]:
    """The replica's sync status now and on every change of any of its sessions (across
    disconnects and reconnects; latest only): what a status bar follows."""
    return _iterate(lambda put: self.observe_sync_status(_StatusListener(put)), latest_only=True)


async def _wait_for_first_sync(self: Replica) -> SyncStatus:
    """Waits until the replica has synced completely once (``has_synced``), in any session."""
    async for status in _replica_statuses(self):
        if status.has_synced:
            return status
    raise FerryError.Closed("the status stream ended")


def _sync_with(
    self: Replica,
    url: str,
    token: typing.Union[str, typing.Callable[[], str], typing.Callable[[], typing.Awaitable[str]]],
    options: typing.Optional[SyncOptions] = None,
) -> SyncSession:
    """Starts syncing; ``token`` is a string, a callable, or a coroutine function (``async
    def``) asked before every connection attempt. A coroutine runs on the event loop running
    when ``sync_with`` was called (call it from a coroutine then), for up to 60 s.

    Kotlin and Swift hand their async fetchers to ``connect_fetching``; Python does not:
    UniFFI runs a Python coroutine for a Rust thread only on a process-wide loop
    (``uniffi_set_event_loop``), which every later async call of the bindings would then be
    scheduled on, whatever loop awaits it. So the coroutine is run here, on the caller's
    loop, from the token provider Ferry's thread calls."""
    get: typing.Callable[[], str]
    if asyncio.iscoroutinefunction(token):
        loop = asyncio.get_running_loop()
        fetch = token

        def get() -> str:
            return asyncio.run_coroutine_threadsafe(fetch(), loop).result(timeout=60)  # type: ignore[arg-type]

    elif callable(token):
        get = token  # type: ignore[assignment]
    else:
        get = lambda: token  # type: ignore[assignment,return-value]  # noqa: E731

    class Tokens(TokenProvider):
        def token(self) -> str:
            return get()  # type: ignore[return-value]

    return self.connect(url, Tokens(), options)


def _resolve_with(self: Replica, table: str, fn: typing.Callable[[ConflictInput], Resolution]) -> None:
    """Registers ``fn`` as the resolver of the ``custom`` columns of ``table``."""

    class Resolver(ConflictResolver):
        def resolve(self, conflict: ConflictInput) -> Resolution:
            return fn(conflict)

    self.set_resolver(table, Resolver())


def _enter(self: Replica) -> Replica:
    return self


def _exit(self: Replica, *exc: typing.Any) -> None:
    self.close_database()


Replica.exec = _exec  # type: ignore[attr-defined]
Replica.select = _select  # type: ignore[attr-defined]
Replica.select_as = _select_as  # type: ignore[attr-defined]
Replica.transaction = _transaction  # type: ignore[attr-defined]
Replica.select_async = _select_async  # type: ignore[attr-defined]
Replica.exec_async = _exec_async  # type: ignore[attr-defined]
Replica.write_async = _write_async  # type: ignore[attr-defined]
Replica.watch_rows = _watch_rows  # type: ignore[attr-defined]
Replica.changes = _changes  # type: ignore[attr-defined]
Replica.conflict_records = _conflict_records  # type: ignore[attr-defined]
Replica.sync_with = _sync_with  # type: ignore[attr-defined]
Replica.resolve_with = _resolve_with  # type: ignore[attr-defined]
Replica.close = Replica.close_database  # type: ignore[attr-defined]
Replica.__enter__ = _enter  # type: ignore[attr-defined]
Replica.__exit__ = _exit  # type: ignore[attr-defined]
WriteTransaction.exec = _exec  # type: ignore[attr-defined]
WriteTransaction.select = _select  # type: ignore[attr-defined]
WriteTransaction.select_as = _select_as  # type: ignore[attr-defined]
WriteTransaction.exec_many = _exec_many  # type: ignore[attr-defined]
SyncSession.statuses = _statuses  # type: ignore[attr-defined]
Replica.statuses = _replica_statuses  # type: ignore[attr-defined]
Schema.to_json = lambda self: schema_to_json(self)  # type: ignore[attr-defined]
Schema.from_json = staticmethod(schema_from_json)  # type: ignore[attr-defined]
Replica.wait_for_first_sync = _wait_for_first_sync  # type: ignore[attr-defined]

"""Ferry for Python: an offline-first SQLite replica that syncs through a Ferry relay.

The classes come from the generated ``ferry_ffi`` module (UniFFI, over the Rust core). This
package adds a thin Pythonic layer on top:

* ``with Replica.open(...) as db:`` closes the database at the end;
* ``with db.transaction() as tx:`` commits, or rolls back if the block raises;
* ``db.exec(sql, *params)`` / ``db.select(sql, *params)`` take and return plain Python values;
  ``tx.exec_many(sql, rows)`` writes many rows in one call;
* ``db.watch_rows(sql, *params)`` and ``session.statuses()`` are async iterators;
* ``db.sync_with(url, token)`` and ``db.resolve_with(table, fn)`` accept plain callables.

Everything Ferry raises is a ``FerryError`` subclass, one per action the app takes
(``FerryError.InvalidInput``, ``FerryError.Unauthorized``, ``FerryError.Offline``,
``FerryError.StorageFull``, ``FerryError.Closed``, ...; the table is in ``docs/bindings.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import typing

from .ferry_ffi import *  # noqa: F401,F403  (the generated API is the public API)
from .ferry_ffi import (
    ChangeListener,
    ConflictInput,
    ConflictRecord,
    ChangeEvent,
    ConflictResolver,
    FerryError,
    QueryListener,
    QueryResult,
    Replica,
    Resolution,
    SqlValue,
    SyncOptions,
    SyncSession,
    SyncStatus,
    Subscription,
    SyncStatusListener,
    TokenProvider,
    WriteTransaction,
)

Py = typing.Union[None, int, float, str, bytes, bool]
Row = typing.Tuple[typing.Any, ...]


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
    """Query results as tuples of Python values."""
    return [tuple(py_value(v) for v in row) for row in result.rows]


def _params(params: typing.Sequence[typing.Any]) -> typing.List[SqlValue]:
    return [sql_value(p) for p in params]


def _exec(self: typing.Union[Replica, WriteTransaction], sql: str, *params: typing.Any) -> int:
    """Runs one statement with Python values as parameters; returns rows changed."""
    return self.execute(sql, _params(params))


def _select(self: typing.Union[Replica, WriteTransaction], sql: str, *params: typing.Any) -> typing.List[Row]:
    """Runs a query with Python values as parameters; returns tuples of Python values."""
    return rows(self.query(sql, _params(params)))


def _exec_many(self: WriteTransaction, sql: str, rows_: typing.Iterable[typing.Sequence[typing.Any]]) -> int:
    """Runs ``sql`` once per parameter row, in one call across the FFI; returns rows changed."""
    return self.execute_many(sql, [_params(r) for r in rows_])


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


def _watch_rows(self: Replica, sql: str, *params: typing.Any) -> typing.AsyncIterator[typing.List[Row]]:
    """The results of ``sql`` now and after every commit that changes them (latest only)."""

    class Listener(QueryListener):
        def __init__(self, put: typing.Callable[[typing.Any], None]) -> None:
            self.put = put

        def on_rows(self, rows_: QueryResult) -> None:
            self.put(rows(rows_))

    return _iterate(lambda put: self.watch(sql, _params(params), Listener(put)), latest_only=True)


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


def _statuses(self: SyncSession) -> typing.AsyncIterator[SyncStatus]:
    """The sync status now and on every change (latest only)."""

    class Listener(SyncStatusListener):
        def __init__(self, put: typing.Callable[[typing.Any], None]) -> None:
            self.put = put

        def on_status(self, status: SyncStatus) -> None:
            self.put(status)

    return _iterate(lambda put: self.observe(Listener(put)), latest_only=True)


def _sync_with(
    self: Replica,
    url: str,
    token: typing.Union[str, typing.Callable[[], str]],
    options: typing.Optional[SyncOptions] = None,
) -> SyncSession:
    """Starts syncing; ``token`` is a string or a callable asked before every connection."""
    get = token if callable(token) else (lambda: token)

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
Replica.transaction = _transaction  # type: ignore[attr-defined]
Replica.watch_rows = _watch_rows  # type: ignore[attr-defined]
Replica.changes = _changes  # type: ignore[attr-defined]
Replica.sync_with = _sync_with  # type: ignore[attr-defined]
Replica.resolve_with = _resolve_with  # type: ignore[attr-defined]
Replica.close = Replica.close_database  # type: ignore[attr-defined]
Replica.__enter__ = _enter  # type: ignore[attr-defined]
Replica.__exit__ = _exit  # type: ignore[attr-defined]
WriteTransaction.exec = _exec  # type: ignore[attr-defined]
WriteTransaction.select = _select  # type: ignore[attr-defined]
WriteTransaction.exec_many = _exec_many  # type: ignore[attr-defined]
SyncSession.statuses = _statuses  # type: ignore[attr-defined]

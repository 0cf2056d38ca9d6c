"""Ferry's Python surface against a real relay: sync and watch between two replicas, a
resolver written in Python deciding a real conflict, typed errors, transactions, closing
and reopening. Behaviour is tested in Rust; these tests cover what crosses the FFI."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import pathlib
import random
import typing

import pytest

import ferry
from ferry import ConnState, FerryError, Resolution, SyncOptions, sql_value
from conftest import Relay, notes_schema

T = 20.0  # seconds any single wait may take


async def until(it: typing.AsyncIterator[typing.Any], pred: typing.Callable[[typing.Any], bool]) -> typing.Any:
    async def go() -> typing.Any:
        async for x in it:
            if pred(x):
                return x

    return await asyncio.wait_for(go(), T)


def session(relay: Relay, db: ferry.Replica, sub: str, write: str = "*") -> ferry.SyncSession:
    token = relay.token(sub, write=write)
    return db.sync_with(relay.url, token, SyncOptions(backoff_min_ms=50, backoff_max_ms=500))


async def sync(*sessions: ferry.SyncSession) -> None:
    for s in sessions:
        await asyncio.wait_for(s.sync_now(), T)


async def pause(s: ferry.SyncSession) -> None:
    s.pause()
    await until(s.statuses(), lambda st: st.state == ConnState.PAUSED)


def test_a_write_in_one_replica_appears_in_the_others_watch(relay: Relay, open_replica) -> None:
    a, b = open_replica("a.db"), open_replica("b.db")

    async def main() -> None:
        sa, sb = session(relay, a, "alice"), session(relay, b, "bob")
        watch = b.watch_rows("SELECT id, title FROM notes")
        assert await until(watch, lambda r: True) == []
        note = ferry.new_id()
        with a.transaction() as tx:
            tx.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'home', ?)", (note, "milk"))
            assert tx.select("SELECT count(*) FROM notes") == [(1,)]
        await sync(sa)
        assert await until(watch, lambda r: r != []) == [(note, "milk")]
        await watch.aclose()
        await sync(sb)
        v = await asyncio.wait_for(sb.verify(), T)
        assert v.matches and v.local_rows == 1
        assert a.checksum() == b.checksum()
        # A complete sync is recorded, in the status and in the file.
        st = sb.status()
        assert st.has_synced and st.last_synced_at_ms is not None
        assert b.last_synced_at_ms() is not None
        assert st.snapshot_rows == st.snapshot_total_rows

    asyncio.run(main())


def test_a_resolver_written_in_python_decides_a_real_conflict(relay: Relay, open_replica) -> None:
    a, b = open_replica("a.db"), open_replica("b.db")
    calls: typing.List[ferry.ConflictInput] = []

    def resolve(c: ferry.ConflictInput) -> Resolution:
        calls.append(c)
        return Resolution.VALUE(sql_value(f"{ferry.py_value(c.local)} & {ferry.py_value(c.remote)}"))

    b.resolve_with("notes", resolve)
    with pytest.raises(FerryError.InvalidInput):  # a table the schema does not sync
        b.resolve_with("nope", resolve)

    async def main() -> None:
        seen = asyncio.create_task(until(b.conflict_records(), lambda c: True))
        sa, sb = session(relay, a, "alice"), session(relay, b, "bob")
        note = ferry.new_id()
        a.exec("INSERT INTO notes(id, folder, title, body) VALUES (?, 'home', 't', 'draft')", (note,))
        await sync(sa, sb)
        await pause(sa)
        await pause(sb)
        a.exec("UPDATE notes SET body = 'from a' WHERE id = ?", (note,))
        b.exec("UPDATE notes SET body = 'from b' WHERE id = ?", (note,))
        sa.resume()
        await sync(sa)
        sb.resume()  # b's edit is the later one at the relay: b's resolver decides
        await sync(sb, sb, sa)
        assert len(calls) == 1
        assert ferry.py_value(calls[0].local) == "from b"
        assert ferry.py_value(calls[0].remote) == "from a"
        for r in (a, b):
            assert r.select("SELECT body FROM notes WHERE id = ?", (note,)) == [("from b & from a",)]
        logged = b.conflicts()
        assert len(logged) == 1 and logged[0].policy == "custom"
        assert "from b & from a" in (logged[0].resolution or "")
        assert (await seen).id == logged[0].id  # the conflict stream saw it as it was logged

    asyncio.run(main())


def test_counters_from_two_replicas_add_up(relay: Relay, open_replica) -> None:
    a, b = open_replica("a.db"), open_replica("b.db")

    async def main() -> None:
        sa, sb = session(relay, a, "alice"), session(relay, b, "bob")
        note = ferry.new_id()
        a.exec("INSERT INTO notes(id, folder, likes) VALUES (?, 'home', 0)", (note,))
        await sync(sa, sb)
        await pause(sa)
        await pause(sb)
        for _ in range(3):
            a.exec("UPDATE notes SET likes = likes + 1 WHERE id = ?", (note,))
        for _ in range(4):
            b.exec("UPDATE notes SET likes = likes + 1 WHERE id = ?", (note,))
        sa.resume()
        sb.resume()
        await sync(sa, sb, sa)
        for r in (a, b):
            assert r.select("SELECT likes FROM notes WHERE id = ?", (note,)) == [(7,)]

    asyncio.run(main())


def test_errors_are_typed(relay: Relay, open_replica, tmp_path: pathlib.Path) -> None:
    a = open_replica("a.db")
    with pytest.raises(FerryError.InvalidInput):
        a.exec("SELEC nonsense")
    with pytest.raises(FerryError.InvalidInput):
        a.exec("INSERT INTO notes(id, folder) VALUES (?, ?)", ("only one",))
    with pytest.raises(FerryError.ReadOnlyTable) as ro:
        a.exec("INSERT INTO announcements(id, text) VALUES ('1', 'hi')")
    assert ro.value.table == "announcements"
    bad = notes_schema()
    bad.tables[0].primary_key = "missing"
    with pytest.raises(FerryError.InvalidInput):
        ferry.Replica.open(str(tmp_path / "bad.db"), bad)
    with pytest.raises(FerryError.InvalidInput):
        a.sync_with("http://not-a-relay", "t")
    # Unencrypted to a host other than loopback: refused unless the app opts in.
    with pytest.raises(FerryError.InvalidInput):
        a.sync_with("ws://relay.example.com/sync", "t")
    a.sync_with("ws://relay.example.com/sync", "t", SyncOptions(allow_insecure=True)).disconnect()
    with pytest.raises(TypeError):
        a.exec("SELECT ?", (object(),))
    with pytest.raises(FerryError.InvalidInput):
        a.sync_with(relay.url, "t", SyncOptions(backoff_min_ms=500, backoff_max_ms=100))
    with pytest.raises(FerryError.InvalidInput):
        a.sync_with(relay.url, "t", SyncOptions(ping_interval_ms=0))
    # Trust: a CA that is no PEM certificate, a pin that is no SHA-256, are named at once.
    with pytest.raises(FerryError.InvalidInput):
        a.sync_with(relay.url, "t", SyncOptions(ca_certificates_pem=["nope"]))
    with pytest.raises(FerryError.InvalidInput):
        a.sync_with(relay.url, "t", SyncOptions(pinned_keys=["sha256/AAAA"]))

    async def main() -> None:
        # A write outside the token's write scopes is refused by the relay and quarantined:
        # the uploads behind it go on, and the app decides.
        s = session(relay, a, "mallory", write="mine")
        a.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'someone-else', 'x')", (ferry.new_id(),))
        a.exec("INSERT INTO seats(id, taken_by) VALUES ('1A', 'mallory')")
        a.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'mine', 'behind')", (ferry.new_id(),))
        await sync(s)
        assert s.status().refused is None
        # The checked write (a server-checked seat) is not set aside: refused for good, it is
        # rolled back at once, as a compare-and-set conflict is.
        assert s.status().quarantined == 1
        (note,) = a.quarantined()
        assert note.code == ferry.RelayCode.FORBIDDEN and note.tables == ["notes"]
        assert not note.discardable
        with pytest.raises(FerryError.CannotDiscard):
            a.discard_quarantined(note.id)
        assert a.select("SELECT count(*) FROM seats") == [(0,)]
        assert [q.id for q in a.quarantined()] == [note.id]

    asyncio.run(main())
    a.close()
    with pytest.raises(FerryError.Closed) as closed:
        a.select("SELECT 1")
    assert "closed" in str(closed.value), "every error says what happened"
    # A file that cannot be opened says so (not a generic error).
    with pytest.raises(FerryError.CannotOpen):
        ferry.Replica.open("/nonexistent-ferry-dir/x.db", notes_schema())


def test_the_schema_records_export_the_relays_json() -> None:
    exported = notes_schema().to_json()
    shipped = pathlib.Path(os.environ["FERRY_NOTES_SCHEMA"]).read_text()
    assert json.loads(exported) == json.loads(shipped), (
        "bindings/tests/notes-schema.json is the export of conftest.notes_schema(): regenerate it"
    )
    assert ferry.Schema.from_json(exported) == notes_schema()
    with pytest.raises(FerryError.InvalidInput, match="write_mode"):
        ferry.Schema.from_json('{"version":1,"tables":[{"name":"t","columns":[],"primary_key":"id","write_mode":"x"}]}')


def test_transaction_rolls_back_when_the_block_raises(open_replica) -> None:
    a = open_replica("a.db")
    with pytest.raises(RuntimeError):
        with a.transaction() as tx:
            tx.exec("INSERT INTO notes(id, folder) VALUES ('1', 'home')")
            raise RuntimeError("changed my mind")
    assert a.select("SELECT count(*) FROM notes") == [(0,)]
    assert a.pending_count() == 0
    with pytest.raises(FerryError.InvalidInput):  # the replica is locked by its own transaction
        with a.transaction():
            a.select("SELECT 1")
    with a.transaction() as tx:
        tx.exec("INSERT INTO notes(id, folder, title) VALUES ('2', 'home', ?)", (b"\x00bytes",))
    assert a.select("SELECT title FROM notes") == [(b"\x00bytes",)]
    assert a.pending_count() == 1
    with a.transaction() as tx:
        n = tx.exec_many("INSERT INTO notes(id, folder, likes) VALUES (?, 'bulk', ?)", [(f"b{i}", i) for i in range(50)])
    assert n == 50
    assert a.select("SELECT count(*), sum(likes) FROM notes WHERE folder = 'bulk'") == [(50, 1225)]
    assert a.pending_count() == 2


@dataclasses.dataclass
class Note:
    id: str
    title: typing.Optional[str]
    likes: int


def test_rows_have_names_and_map_into_dataclasses(open_replica) -> None:
    a = open_replica("a.db")
    a.exec("INSERT INTO notes(id, folder, title, likes) VALUES (?, 'home', ?, ?)", ["n1", "milk", 3])
    a.exec("INSERT INTO notes(id, folder, title, likes) VALUES (?, 'home', NULL, ?)", ("n2", 0))
    rows = a.select("SELECT id, title, likes FROM notes WHERE folder = ? ORDER BY id", ("home",))
    first = rows[0]
    assert first == ("n1", "milk", 3)  # still a tuple
    assert first["title"] == "milk" and first.likes == 3 and first[0] == "n1"
    assert first.keys() == ["id", "title", "likes"]
    assert first.as_dict() == {"id": "n1", "title": "milk", "likes": 3}
    assert repr(first) == "Row(id='n1', title='milk', likes=3)"
    with pytest.raises(KeyError, match="no column 'nope'"):
        first["nope"]
    with pytest.raises(AttributeError, match="no column 'nope'"):
        first.nope
    assert a.select_as(Note, "SELECT id, title, likes FROM notes ORDER BY id") == [
        Note("n1", "milk", 3),
        Note("n2", None, 0),
    ]
    with a.transaction() as tx:
        assert tx.select_as(Note, "SELECT id, title, likes FROM notes WHERE id = ?", ("n2",)) == [Note("n2", None, 0)]
    # Parameters as sqlite3 takes them: a sequence for `?`, a mapping for named ones.
    with pytest.raises(TypeError, match="sequence"):
        a.select("SELECT ?", "n1")
    assert a.select("SELECT title FROM notes WHERE id = :id AND likes >= @min", {"id": "n1", "min": 3}) == [("milk",)]
    with a.transaction() as tx:
        tx.exec("UPDATE notes SET title = :t WHERE id = $id", {"t": "oat milk", "id": "n1"})
        tx.exec_many("UPDATE notes SET likes = likes + :d WHERE id = :id", [{"d": 0, "id": "n1"}, {"d": 0, "id": "n2"}])
        assert tx.select("SELECT title FROM notes WHERE id = :id", {"id": "n1"}) == [("oat milk",)]
    with pytest.raises(TypeError, match="no value for the named parameter :id"):
        a.select("SELECT :id", {"other": 1})
    with pytest.raises(TypeError, match="placeholder"):
        a.select("SELECT ?", {"id": "n1"})
    # Every value type crosses the packed form intact; an int beyond 64 bits is refused.
    values = (None, -(2**63), 2**63 - 1, 0.1, float("inf"), float("-inf"), "ü \"q\"\n", b"\x00\xff", True)
    got = a.select("SELECT " + ", ".join("?" * len(values)), values)[0]
    assert tuple(got) == (None, -(2**63), 2**63 - 1, 0.1, float("inf"), float("-inf"), "ü \"q\"\n", b"\x00\xff", 1)
    assert a.select("SELECT 2.0 AS f")[0].f == 2.0 and isinstance(a.select("SELECT 2.0 AS f")[0].f, float)
    with pytest.raises(FerryError.InvalidInput, match="64-bit"):
        a.select("SELECT ?", (2**64,))
    # Counts and positions are plain ints (signed at the FFI).
    assert isinstance(a.cursor(), int) and a.pending_count() == 3

    async def off_the_loop() -> None:
        assert await a.exec_async("UPDATE notes SET likes = likes + 1 WHERE id = ?", ("n1",)) == 1
        made = await a.write_async(lambda tx: tx.exec("INSERT INTO notes(id, folder) VALUES ('n3', 'home')"))
        assert made == 1
        with pytest.raises(ZeroDivisionError):  # rolled back
            await a.write_async(lambda tx: (tx.exec("DELETE FROM notes"), 1 / 0))
        got = await a.select_async("SELECT id, likes FROM notes ORDER BY id")
        assert [(r.id, r.likes) for r in got] == [("n1", 4), ("n2", 0), ("n3", 0)]

    asyncio.run(off_the_loop())


def test_the_direct_call_path_answers_as_the_generated_methods(open_replica) -> None:
    # select/exec call the library's C entry points (ferry/_direct.py): same answers, same
    # typed errors, on a replica and in a transaction, for many calls, results longer than the
    # per-thread buffer, and threads calling at once.
    from ferry import _direct

    assert _direct.MARSHALLED, "this Python reads the library's marshal form (else JSON is used)"

    def generated(obj, sql: str, packed: str):  # the same query through the generated method
        res = obj.query(sql, [ferry.sql_value(v) for v in json.loads(packed)])
        return (tuple(res.columns), [tuple(ferry.py_value(v) for v in row) for row in res.rows])

    a = open_replica("a.db")
    rng = random.Random(7)
    big = "€" * 200_000
    with a.transaction() as tx:
        for i in range(500):
            title = "".join(rng.choice("aü€\"\n\\ ") for _ in range(rng.randrange(0, 40)))
            params = ferry._pack([f"d{i}", title, i])
            sql = "INSERT INTO notes(id, folder, title, likes) VALUES (?, 'home', ?, ?)"
            assert _direct.execute_packed(tx, sql, params) == 1
            query = "SELECT id, title, likes FROM notes WHERE id = ?"
            assert _direct.query(tx, query, ferry._pack([f"d{i}"])) == generated(tx, query, ferry._pack([f"d{i}"]))
        with pytest.raises(FerryError.InvalidInput):
            _direct.query(tx, "SELEC nonsense", "[]")
        with pytest.raises(FerryError.InvalidInput):
            _direct.execute_packed(tx, "INSERT INTO notes(id) VALUES (?)", "[1, 2")
        assert tx.exec("UPDATE notes SET body = ? WHERE id = 'd1'", (big,)) == 1
    for _ in range(2_000):
        k = f"d{rng.randrange(500)}"
        query = "SELECT id, title, likes, body FROM notes WHERE id = ?"
        assert _direct.query(a, query, ferry._pack([k])) == generated(a, query, ferry._pack([k]))
    assert a.select("SELECT body FROM notes WHERE id = 'd1'") == [(big,)]
    with pytest.raises(FerryError.ReadOnlyTable):
        _direct.execute_packed(a, "INSERT INTO announcements(id, text) VALUES ('1', 'hi')", "[]")
    assert a.select("SELECT count(*) FROM notes") == [(500,)]

    def reader(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(300):
            i = r.randrange(500)
            rows = a.select("SELECT id, likes, length(body) FROM notes WHERE id = ?", (f"d{i}",))
            assert rows == [(f"d{i}", i, 200_000 if i == 1 else None)], rows
            if i == 1:
                assert a.select("SELECT body FROM notes WHERE id = 'd1'")[0].body == big

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(reader, seed) for seed in range(8)]:
            f.result()
    a.close_database()
    with pytest.raises(FerryError.Closed):
        a.select("SELECT 1")
    with pytest.raises(FerryError.Closed):
        a.exec("DELETE FROM notes")


@pytest.mark.parametrize("marshalled", [True, False])
def test_every_value_kind_reads_back_through_either_result_form(
    open_replica, monkeypatch: pytest.MonkeyPatch, marshalled: bool
) -> None:
    # Results come as marshal (ferry/_direct.py), or as packed JSON where a Python reads marshal
    # differently: both give the same rows, for every value SQLite can hold.
    from ferry import _direct

    monkeypatch.setattr(_direct, "MARSHALLED", marshalled)
    a = open_replica("a.db")
    rng = random.Random(11)
    edge = [0, 1, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32, 2**45 + 3, -(2**60), 2**63 - 1, -(2**63)]
    ints = edge + [rng.randrange(-(2**63), 2**63) for _ in range(300)]
    reals = [0.0, -0.0, 0.5, -1e300, 5e-324, math.inf, -math.inf] + [rng.uniform(-1e9, 1e9) for _ in range(50)]
    texts = ["", "é", "€" * 3, "a\x00b", "\U0001f600", "x" * 70_000]
    blobs = [b"", b"\x00\xff", bytes(range(256)), b"z" * 70_000]
    values = [None] + ints + reals + texts + blobs
    for i, v in enumerate(values):
        assert a.select("SELECT ? AS v, ? AS i", (v, i)) == [(v, i)], v
    # SQLite stores a NaN as NULL (so does sqlite3).
    assert a.select("SELECT ? AS nan", (math.nan,)) == [(None,)]
    empty = a.select("SELECT 1 AS x WHERE 0")
    assert empty == []
    row = a.select("SELECT 1 AS one, 'two' AS two")[0]
    assert (row.one, row["two"], row._names) == (1, "two", ("one", "two"))


def test_ferrys_log_records_reach_the_app(open_replica, caplog: pytest.LogCaptureFixture) -> None:
    got: typing.List[ferry.LogRecord] = []
    ferry.log_with(got.append, ferry.LogLevel.DEBUG)
    try:
        a = open_replica("logged.db")
        assert any(r.level == ferry.LogLevel.DEBUG and "replica opened" in r.message for r in got), got

        class Throws(ferry.ChangeListener):
            def on_change(self, event: ferry.ChangeEvent) -> None:
                raise ValueError("listener bug")

            def on_conflict(self, conflict: ferry.ConflictRecord) -> None:
                pass

        sub = a.subscribe(Throws())
        a.exec("INSERT INTO notes(id, folder) VALUES ('1', 'home')")
        warned = [r for r in got if r.level == ferry.LogLevel.WARN and "change listener failed" in r.message]
        assert warned and warned[0].target.startswith("ferry_ffi"), got
        sub.cancel()
        # A live subscription the app lets go of stops its listener, and says so.
        a.subscribe(Throws())
        assert any("dropped without cancel()" in r.message for r in got), got
        # Into Python's logging, at the level chosen.
        ferry.use_logging(level=ferry.LogLevel.WARN)
        with caplog.at_level(logging.DEBUG, logger="ferry"):
            sub = a.subscribe(Throws())
            a.exec("INSERT INTO notes(id, folder) VALUES ('2', 'home')")
            open_replica("quiet.db")  # its debug record is below the level
            sub.cancel()
        names = [(r.name, r.levelname) for r in caplog.records]
        assert ("ferry.ferry_ffi.listeners", "WARNING") in names, names
        assert all(level != "DEBUG" for _, level in names), names
    finally:
        ferry.log_with(None)
    count = len(got)
    open_replica("after.db")
    assert len(got) == count


def test_a_coroutine_supplies_the_token_and_a_failing_one_is_retried(relay: Relay, open_replica) -> None:
    a = open_replica("fetch.db")
    token = relay.token("alice")
    calls: typing.List[int] = []

    async def fetch() -> str:
        calls.append(1)
        await asyncio.sleep(0.01)  # e.g. a refresh over the network
        if len(calls) == 1:
            raise RuntimeError("identity provider unreachable")
        return token

    async def main() -> None:
        s = a.sync_with(relay.url, fetch, SyncOptions(backoff_min_ms=50, backoff_max_ms=200))
        failed = await until(s.statuses(), lambda st: st.last_error is not None)
        assert "token" in failed.last_error.message, failed.last_error
        a.exec("INSERT INTO notes(id, folder, title) VALUES ('1', 'home', 'x')")
        await sync(s)
        assert len(calls) >= 2 and a.pending_count() == 0
        s.disconnect()

    asyncio.run(main())


def test_logout_clears_and_resync_downloads_again(relay: Relay, open_replica) -> None:
    a, b = open_replica("a.db"), open_replica("b.db")

    async def main() -> None:
        sa, sb = session(relay, a, "alice"), session(relay, b, "bob")
        a.exec("INSERT INTO notes(id, folder, title) VALUES ('1', 'home', 'milk')")
        await sync(sa, sb)
        assert b.select("SELECT title FROM notes") == [("milk",)]
        # Resync refuses while a write is unpushed, and keeps everything.
        sb.pause()
        b.exec("INSERT INTO notes(id, folder, title) VALUES ('2', 'home', 'eggs')")
        with pytest.raises(FerryError.InvalidInput):
            b.resync()
        sb.resume()
        await sync(sb)
        sources: typing.List[ferry.ChangeSource] = []

        class Sources(ferry.ChangeListener):
            def on_change(self, event: ferry.ChangeEvent) -> None:
                sources.append(event.source)

            def on_conflict(self, conflict: ferry.ConflictRecord) -> None:
                pass

        sub = b.subscribe(Sources())
        b.resync()  # ends the session, wipes the rows
        assert sources == [ferry.ChangeSource.CLEARED]
        sub.cancel()
        assert b.select("SELECT count(*) FROM notes") == [(0,)]
        sb2 = session(relay, b, "bob")
        await sync(sb2)
        assert b.select("SELECT title FROM notes ORDER BY id") == [("milk",), ("eggs",)]
        assert (await asyncio.wait_for(sb2.verify(), T)).matches
        # Logging out: nothing left, a new replica id, ready for another user.
        before = b.replica_id()
        b.disconnect_and_clear()
        assert b.select("SELECT count(*) FROM notes") == [(0,)]
        assert b.replica_id() != before and b.cursor() == 0 and b.last_synced_at_ms() is None
        sc = session(relay, b, "carol")
        await sync(sc)
        assert b.select("SELECT count(*) FROM notes") == [(2,)]
        sa.disconnect()

    asyncio.run(main())


def test_the_database_status_spans_sessions_with_progress(relay: Relay, open_replica) -> None:
    a, b = open_replica("a.db"), open_replica("b.db")

    async def main() -> None:
        sa = session(relay, a, "alice")
        with a.transaction() as tx:
            tx.exec_many("INSERT INTO notes(id, folder, title) VALUES (?, 'home', 't')", [(f"n{i}",) for i in range(300)])
        await sync(sa)
        seen: typing.List[ferry.SyncStatus] = []
        it = b.statuses()
        first = await until(it, lambda st: True)
        assert first.state == ConnState.STOPPED and not first.has_synced
        assert first.download_progress is None and first.upload_error is None
        sb = session(relay, b, "bob")
        synced = asyncio.ensure_future(asyncio.wait_for(b.wait_for_first_sync(), T))

        def done(st: ferry.SyncStatus) -> bool:
            seen.append(st)
            return st.has_synced

        await until(it, done)
        await synced
        assert all(0.0 <= s.download_progress <= 1.0 for s in seen if s.download_progress is not None)
        sb.disconnect()
        stopped = await until(it, lambda st: st.state == ConnState.STOPPED)
        assert stopped.has_synced and stopped.last_synced_at_ms is not None
        assert b.sync_status().has_synced
        # A new session reaches the same stream; logging out starts it over.
        sb2 = session(relay, b, "bob")
        await until(it, lambda st: st.state == ConnState.ONLINE)
        sb2.disconnect()
        b.disconnect_and_clear()
        cleared = await until(it, lambda st: not st.has_synced)
        assert cleared.state == ConnState.STOPPED and cleared.cursor == 0
        sa.disconnect()

    asyncio.run(main())


def test_sync_now_fails_fast_on_a_refused_token_and_an_unreachable_relay(relay: Relay, open_replica) -> None:
    a = open_replica("fast.db")

    async def main() -> None:
        s = a.sync_with(relay.url, "not-a-token", SyncOptions(backoff_min_ms=50, backoff_max_ms=200))
        with pytest.raises(FerryError.Unauthorized):
            await asyncio.wait_for(s.sync_now(), T)
        assert s.status().failures >= 1
        s.disconnect()
        s = a.sync_with("ws://127.0.0.1:9/sync", "t", SyncOptions(backoff_min_ms=50, backoff_max_ms=200))
        with pytest.raises(FerryError.Offline):
            await asyncio.wait_for(s.sync_now(), T)
        s.disconnect()

    asyncio.run(main())


def test_closing_releases_the_database_and_reopen_works(relay: Relay, tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "c.db")
    note = ferry.new_id()

    async def first() -> None:
        with ferry.Replica.open(path, notes_schema()) as r:
            s = session(relay, r, "carol")
            r.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'home', 'kept')", (note,))
            await sync(s)
            st = await until(s.statuses(), lambda st: st.state == ConnState.ONLINE and st.pending == 0)
            assert st.cursor >= 1

    asyncio.run(first())
    assert not os.path.exists(path + "-wal"), "the connection is closed"
    with ferry.Replica.open(path, notes_schema()) as r:
        assert r.select("SELECT title FROM notes WHERE id = ?", (note,)) == [("kept",)]
        r.exec("UPDATE notes SET title = 'again' WHERE id = ?", (note,))
        r.close()
        r.close()  # twice is fine
    with ferry.Replica.open(path, notes_schema()) as r:
        assert r.select("SELECT title FROM notes") == [("again",)]


def test_migrations_upgrade_the_schema_and_changes_are_observed(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "m.db")

    async def first_change() -> ferry.ChangeEvent:
        with ferry.Replica.open(path, notes_schema()) as r:
            events = r.changes()
            pending = asyncio.ensure_future(events.__anext__())
            await asyncio.sleep(0)
            r.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'home', 'old')", (ferry.new_id(),))
            event = await asyncio.wait_for(pending, T)
            await events.aclose()
            return event

    event = asyncio.run(first_change())
    assert event.tables == ["notes"] and event.source == ferry.ChangeSource.LOCAL
    v2 = notes_schema()
    v2.version = 2
    v2.tables[0].columns.append(ferry.ColumnDecl(name="pinned", column_type=ferry.ColumnType.INTEGER, policy=ferry.Policy.LWW))
    v2.migrations = [ferry.Migration(version=2, sql="CREATE TABLE drafts(id TEXT PRIMARY KEY, text TEXT); UPDATE notes SET pinned = 0;")]
    with ferry.Replica.open(path, v2) as r:
        assert r.schema_version() == 2
        assert r.select("SELECT title, pinned FROM notes") == [("old", 0)]
        r.exec("INSERT INTO drafts VALUES ('d', 'local only')")
    with pytest.raises(FerryError.SchemaTooNew):
        ferry.Replica.open(path, notes_schema())


def test_a_primary_replica_writes_a_read_only_table_others_receive(relay: Relay, tmp_path: pathlib.Path, open_replica) -> None:
    primary = ferry.Replica.open_with(str(tmp_path / "primary.db"), notes_schema(),
                                      ferry.ReplicaOptions(primary_tables=["announcements"]))
    dash = open_replica("dash.db")
    with pytest.raises(FerryError.InvalidInput):
        ferry.Replica.open_with(str(tmp_path / "x.db"), notes_schema(), ferry.ReplicaOptions(primary_tables=["notes"]))

    async def main() -> None:
        token = relay.token("backend", primary="announcements")
        sp = primary.sync_with(relay.url, token, SyncOptions(backoff_min_ms=50, backoff_max_ms=500))
        sd = session(relay, dash, "dash")
        primary.exec("INSERT INTO announcements(id, text) VALUES ('1', 'maintenance at noon')")
        await sync(sp, sd)
        assert dash.select("SELECT text FROM announcements") == [("maintenance at noon",)]
        with pytest.raises(FerryError.ReadOnlyTable):
            dash.exec("UPDATE announcements SET text = 'x'")
        sp.disconnect()

    asyncio.run(main())
    primary.close()


def test_checked_writes_and_leases_cross_the_ffi(relay: Relay, open_replica) -> None:
    a, b = open_replica("a.db"), open_replica("b.db")

    async def main() -> None:
        sa, sb = session(relay, a, "a"), session(relay, b, "b")
        a.exec("INSERT INTO seats(id, taken_by) VALUES ('12A', NULL)")
        await sync(sa, sb)
        # Both book the same seat; b is offline, a's booking reaches the relay first.
        await pause(sb)
        tx = b.begin_write()
        tx.exec("UPDATE seats SET taken_by = 'b' WHERE id = '12A'")
        late = tx.commit_change()
        assert late is not None
        tx = a.begin_write()
        tx.exec("UPDATE seats SET taken_by = 'a' WHERE id = '12A'")
        assert await asyncio.wait_for(sa.commit_checked(tx), T) > 0
        sb.resume()
        with pytest.raises(FerryError.ConflictRejected) as lost:
            await asyncio.wait_for(sb.verdict(late), T)
        assert lost.value.code == "conflict"
        await sync(sb)
        assert sb.status().rolled_back == 1  # counted once, whether refused or met offline
        assert b.select("SELECT taken_by FROM seats") == [("a",)]
        assert any(c.rejected and c.table == "seats" for c in b.conflicts())

        # Leases: one holder at a time; a guarded write carries the fencing token.
        grant = await asyncio.wait_for(sa.acquire_lease("check-in", 10_000), T)
        with pytest.raises(FerryError.LeaseUnavailable):
            await asyncio.wait_for(sb.acquire_lease("check-in", 10_000), T)
        tx = a.begin_write()
        tx.guard(grant)
        tx.exec("INSERT INTO seats(id, taken_by) VALUES ('12B', 'a')")
        assert await asyncio.wait_for(sa.commit_checked(tx), T) > 0
        await asyncio.wait_for(sa.release_lease(grant), T)
        newer = await asyncio.wait_for(sb.acquire_lease("check-in", 10_000), T)
        assert newer.token > grant.token
        tx = a.begin_write()
        tx.guard(grant)  # released: the token is stale
        tx.exec("UPDATE seats SET taken_by = 'a again' WHERE id = '12B'")
        with pytest.raises(FerryError.ConflictRejected) as fenced:
            await asyncio.wait_for(sa.commit_checked(tx), T)
        assert fenced.value.code == "fenced"
        assert a.select("SELECT taken_by FROM seats WHERE id = '12B'") == [("a",)]
        sa.disconnect()
        sb.disconnect()

    asyncio.run(main())


def test_subscriptions_back_fill_and_evict_scopes(relay: Relay, open_replica) -> None:
    a, b = open_replica("a.db"), open_replica("b.db")

    async def main() -> None:
        sa = session(relay, a, "alice")
        for folder in ("home", "work"):
            for i in range(20):
                a.exec("INSERT INTO notes(id, folder, title) VALUES (?, ?, 't')", (f"{folder}{i}", folder))
        await sync(sa)
        b.set_subscriptions(["work"])
        assert b.subscriptions() == ["work"]
        sb = session(relay, b, "bob")
        await asyncio.wait_for(sb.wait_for_first_sync("work", 20_000), T)
        assert sb.has_synced("work") and not sb.has_synced("home")
        assert b.select("SELECT DISTINCT folder FROM notes") == [("work",)]
        # Open another folder on demand: back-filled (its rows are older than b's cursor).
        sb.subscribe("home")
        await asyncio.wait_for(sb.wait_for_first_sync("home", 20_000), T)
        assert b.select("SELECT count(*) FROM notes") == [(40,)]
        # Drop one: its rows go, nothing is pushed or deleted upstream.
        sb.unsubscribe("work")
        await until(sb.statuses(), lambda st: b.select("SELECT count(*) FROM notes WHERE folder = 'work'") == [(0,)])
        await sync(sb)
        ev = b.evictions(10)
        assert [(e.scope, e.rows, e.pending_writes) for e in ev] == [("work", 20, 0)]
        v = await asyncio.wait_for(sb.verify(), T)
        assert v.matches and v.local_rows == 20
        assert a.select("SELECT count(*) FROM notes") == [(40,)]
        # Subscribing to a scope the token may not read is refused with a typed code.
        c = open_replica("c.db")
        c.set_subscriptions(["home"])
        sc = c.sync_with(relay.url, relay.token("carol", read="work"), SyncOptions(backoff_min_ms=50, backoff_max_ms=500))
        st = await until(sc.statuses(), lambda st: st.last_error is not None)
        assert st.last_error.code == ferry.RelayCode.FORBIDDEN
        sc.disconnect()
        with pytest.raises(FerryError.InvalidInput):
            b.set_subscriptions(["{sub}"])

    asyncio.run(main())

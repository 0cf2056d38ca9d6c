#!/usr/bin/env python3
"""What crossing the FFI costs: the same inserts and reads from Python through Ferry and
through Python's own sqlite3 module, in the same run, as ratios.

    scripts/bindings-build && scripts/test-python   # installs the wheel into target/wheel-venv
    target/wheel-venv/bin/python bindings/python/benches/ffi_bench.py [ROWS]

Both sides use a file in a temporary folder, WAL mode, synchronous=NORMAL (Ferry's own
settings), and insert ROWS rows of (ULID text key, folder, title, body, likes) in one
transaction (one call per row, then one call for all rows: executemany / exec_many), then in
transactions of 1 row for ROWS/10 rows, then read everything back, then ROWS/10 point reads
by key (one call each).
Ferry's side also captures every write into its change log; that is part of what is measured.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import time

import ferry
from ferry import ColumnDecl, ColumnType, DeleteRule, Policy, Schema, TableDecl, TableMode

SQL = "INSERT INTO notes(id, folder, title, body, likes) VALUES (?, ?, ?, ?, ?)"


def col(name: str, ty: ColumnType = ColumnType.TEXT, policy: Policy = Policy.LWW) -> ColumnDecl:
    return ColumnDecl(name=name, column_type=ty, policy=policy)


SCHEMA = Schema(version=1, tables=[TableDecl(
    name="notes", primary_key="id", mode=TableMode.MULTI_WRITER, delete_rule=DeleteRule.DELETE_WINS,
    scope_column="folder",
    columns=[col("id"), col("folder"), col("title"), col("body"), col("likes", ColumnType.INTEGER)],
)])


def rows(n: int) -> list[tuple]:
    return [(ferry.new_id(), f"f{i % 10}", f"title {i}", "body " * 8, i) for i in range(n)]


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    small = max(n // 10, 1)
    with tempfile.TemporaryDirectory() as d:
        plain = sqlite3.connect(os.path.join(d, "plain.db"), isolation_level=None)
        plain.execute("PRAGMA journal_mode=WAL")
        plain.execute("PRAGMA synchronous=NORMAL")
        plain.execute("CREATE TABLE notes(id TEXT PRIMARY KEY NOT NULL, folder TEXT, title TEXT, body TEXT, likes INTEGER)")
        db = ferry.Replica.open(os.path.join(d, "ferry.db"), SCHEMA)

        bulk_a, bulk_b = rows(n), rows(n)

        def plain_bulk() -> None:
            plain.execute("BEGIN")
            for r in bulk_a:
                plain.execute(SQL, r)
            plain.execute("COMMIT")

        def ferry_bulk() -> None:
            with db.transaction() as tx:
                for r in bulk_b:
                    tx.exec(SQL, r)

        many_a, many_b = rows(n), rows(n)

        def plain_many() -> None:
            plain.execute("BEGIN")
            plain.executemany(SQL, many_a)
            plain.execute("COMMIT")

        def ferry_many() -> None:
            with db.transaction() as tx:
                tx.exec_many(SQL, many_b)

        one_a, one_b = rows(small), rows(small)

        def plain_each() -> None:
            for r in one_a:
                plain.execute("BEGIN")
                plain.execute(SQL, r)
                plain.execute("COMMIT")

        def ferry_each() -> None:
            for r in one_b:
                db.exec(SQL, r)

        total = 2 * n + small

        def plain_read() -> None:
            assert len(plain.execute("SELECT * FROM notes").fetchall()) == total

        def ferry_read() -> None:
            assert len(db.select("SELECT id, folder, title, body, likes FROM notes")) == total

        keys_a = [r[0] for r in bulk_a[:small]]
        keys_b = [r[0] for r in bulk_b[:small]]
        point = "SELECT id, folder, title, body, likes FROM notes WHERE id = ?"

        def plain_point() -> None:
            for k in keys_a:
                assert plain.execute(point, (k,)).fetchone() is not None

        def ferry_point() -> None:
            for k in keys_b:
                assert db.select(point, (k,))

        results = [
            (f"{n} inserts, one transaction", plain_bulk, ferry_bulk, n),
            (f"{n} inserts, executemany / exec_many", plain_many, ferry_many, n),
            (f"{small} inserts, one transaction each", plain_each, ferry_each, small),
            (f"read {total} rows", plain_read, ferry_read, total),
            (f"{small} point reads by key", plain_point, ferry_point, small),
        ]
        print(f"{'workload':40} {'sqlite3 (rows/s)':>18} {'ferry (rows/s)':>16} {'ratio':>7}")
        for name, p, f, count in results:
            tp, tf = timed(p), timed(f)
            print(f"{name:40} {count / tp:18,.0f} {count / tf:16,.0f} {tf / tp:6.2f}x")
        db.close()
        plain.close()


if __name__ == "__main__":
    main()

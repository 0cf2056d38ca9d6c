#!/usr/bin/env python3
"""python-notes: a command-line notes app on Ferry's Python package. Works offline; `sync`
exchanges changes with a relay (FERRY_RELAY, FERRY_TOKEN). The tests run it end to end.

    notes.py --db notes.db add FOLDER TITLE [BODY]
    notes.py --db notes.db list
    notes.py --db notes.db like ID
    notes.py --db notes.db sync
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import typing

import ferry
from ferry import ColumnDecl, ColumnType, DeleteRule, Policy, Schema, TableDecl, TableMode


def col(name: str, ty: ColumnType = ColumnType.TEXT, policy: Policy = Policy.LWW, not_null: bool = False) -> ColumnDecl:
    return ColumnDecl(name=name, column_type=ty, policy=policy, not_null=not_null)


SCHEMA = Schema(
    version=1,
    tables=[
        TableDecl(
            name="notes", primary_key="id", mode=TableMode.MULTI_WRITER,
            delete_rule=DeleteRule.DELETE_WINS, scope_column="folder",
            columns=[col("id"), col("folder", not_null=True), col("title"),
                     col("body", policy=Policy.CUSTOM), col("likes", ColumnType.INTEGER, Policy.COUNTER)],
        ),
        TableDecl(
            name="announcements", primary_key="id", mode=TableMode.READ_ONLY,
            delete_rule=DeleteRule.DELETE_WINS, columns=[col("id"), col("text")],
        ),
    ],
)


async def sync(db: ferry.Replica) -> None:
    token = os.environ.get("FERRY_TOKEN")
    if not token:
        sys.exit("notes: set FERRY_TOKEN")
    session = db.sync_with(os.environ.get("FERRY_RELAY", "ws://127.0.0.1:7070/sync"), token)
    try:
        await asyncio.wait_for(session.sync_now(), 30)
        s = session.status()
        print(f"synced: cursor {s.cursor}, pending {s.pending}")
    finally:
        session.disconnect()


@dataclasses.dataclass
class Note:
    """A note as the app sees it (rows mapped with ``db.select_as(Note, sql)``)."""

    id: str
    folder: str
    title: typing.Optional[str]
    body: typing.Optional[str]
    likes: int


def main() -> None:
    p = argparse.ArgumentParser(description="Ferry notes")
    p.add_argument("--db", required=True)
    sub = p.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add")
    add.add_argument("folder")
    add.add_argument("title")
    add.add_argument("body", nargs="?")
    sub.add_parser("list")
    like = sub.add_parser("like")
    like.add_argument("id")
    sub.add_parser("sync")
    args = p.parse_args()
    try:
        with ferry.Replica.open(args.db, SCHEMA) as db:
            if args.cmd == "add":
                note = db.new_id()
                with db.transaction() as tx:
                    tx.exec("INSERT INTO notes(id, folder, title, body) VALUES (?, ?, ?, ?)", (note, args.folder, args.title, args.body))
                print(f"added {note}")
            elif args.cmd == "list":
                for n in db.select_as(Note, "SELECT id, folder, title, body, likes FROM notes ORDER BY folder, title, id"):
                    print(f"{n.id}  [{n.folder}] {n.title}  {n.body or ''}  ({n.likes} likes)")
            elif args.cmd == "like":
                if db.exec("UPDATE notes SET likes = likes + 1 WHERE id = ?", (args.id,)) == 0:
                    sys.exit(f"notes: no note {args.id}")
            elif args.cmd == "sync":
                asyncio.run(sync(db))
    except ferry.FerryError as e:
        sys.exit(f"notes: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()

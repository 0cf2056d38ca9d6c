"""Not a test: type-checked by scripts/test-python (mypy --strict) against the installed
wheel, so the stub (ferry/__init__.pyi) and the helpers stay in step. Never run."""

from __future__ import annotations

import dataclasses
import typing

import ferry


@dataclasses.dataclass
class Note:
    id: str
    title: typing.Optional[str]


async def usage(schema: ferry.Schema, url: str) -> typing.List[Note]:
    db = ferry.Replica.open("x.db", schema)
    n: int = db.exec("INSERT INTO notes(id, title) VALUES (?, ?)", ("1", "milk"))
    row: ferry.Row = db.select("SELECT id, title FROM notes WHERE id = :id", {"id": "1"})[0]
    title: typing.Any = row.title
    with db.transaction() as tx:
        tx.exec_many("UPDATE notes SET title = ? WHERE id = ?", [("oat", "1")])
        notes: typing.List[Note] = tx.select_as(Note, "SELECT id, title FROM notes")
    await db.exec_async("DELETE FROM notes WHERE id = ?", ("1",))
    made: int = await db.write_async(lambda t: t.exec("INSERT INTO notes(id) VALUES ('2')"))
    session = db.sync_with(url, "token")
    async for status in db.statuses():
        progress: typing.Optional[float] = status.download_progress
        break
    async for st in session.statuses():
        break
    synced: ferry.SyncStatus = await db.wait_for_first_sync()
    exported: str = schema.to_json()
    again: ferry.Schema = ferry.Schema.from_json(exported)
    db.close()
    del n, title, made, progress, synced, again, st
    return notes

"""A real ferry-relay process on 127.0.0.1 (random port) per test, with the notes schema.

scripts/test-python sets FERRY_RELAY_BIN and FERRY_NOTES_SCHEMA and puts the built package
(generated module and library included) on PYTHONPATH.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import typing

import pytest

import ferry
from ferry import ColumnDecl, ColumnType, DeleteRule, Policy, Schema, TableDecl, TableMode

SECRET = "python-binding-tests-secret-not-for-production"


class Relay:
    def __init__(self, tmp: pathlib.Path) -> None:
        self.bin = os.environ["FERRY_RELAY_BIN"]
        tmp.mkdir(parents=True, exist_ok=True)
        self.config = tmp / "relay.toml"
        # The relay is configured with the schema the app declares as records, exported.
        schema = tmp / "schema.json"
        schema.write_text(notes_schema().to_json())
        self.config.write_text(
            f'listen = "127.0.0.1:0"\ndata = "{tmp / "data"}"\n'
            f'schema = "{schema}"\n[log]\nlevel = "warn"\n'
            f'[auth]\nhs256_secret = "{SECRET}"\n'
        )
        self.proc = subprocess.Popen(
            [self.bin, "--config", str(self.config), "serve"], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening" in line, f"the relay did not start: {line!r}"
        self.url = f"ws://{line.split()[-1]}/sync"

    def token(self, sub: str, read: str = "*", write: str = "*", primary: typing.Optional[str] = None) -> str:
        extra = ["--primary", primary] if primary else []
        out = subprocess.run(
            [self.bin, "--config", str(self.config), "token", "--sub", sub,
             "--read", read, "--write", write, "--ttl", "1h", *extra],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def relay(tmp_path: pathlib.Path) -> typing.Iterator[Relay]:
    r = Relay(tmp_path / "relay")
    yield r
    r.stop()


def col(name: str, ty: ColumnType = ColumnType.TEXT, policy: Policy = Policy.LWW, not_null: bool = False) -> ColumnDecl:
    return ColumnDecl(name=name, column_type=ty, policy=policy, not_null=not_null)


def notes_schema() -> Schema:
    """The notes schema as records (the same as bindings/tests/notes-schema.json)."""
    return Schema(
        version=1,
        tables=[
            TableDecl(
                name="notes", primary_key="id", mode=TableMode.MULTI_WRITER,
                delete_rule=DeleteRule.DELETE_WINS, scope_column="folder",
                columns=[col("id"), col("folder", not_null=True), col("title"),
                         col("body", policy=Policy.CUSTOM),
                         col("likes", ColumnType.INTEGER, Policy.COUNTER)],
            ),
            TableDecl(
                name="announcements", primary_key="id", mode=TableMode.READ_ONLY,
                delete_rule=DeleteRule.DELETE_WINS, columns=[col("id"), col("text")],
            ),
            TableDecl(
                name="seats", primary_key="id", mode=TableMode.SERVER_CHECKED,
                delete_rule=DeleteRule.DELETE_WINS, scope_column=None,
                columns=[col("id"), col("taken_by")],
            ),
        ],
    )


@pytest.fixture
def open_replica(tmp_path: pathlib.Path) -> typing.Iterator[typing.Callable[[str], ferry.Replica]]:
    opened: typing.List[ferry.Replica] = []

    def open_(name: str) -> ferry.Replica:
        r = ferry.Replica.open(str(tmp_path / name), notes_schema())
        opened.append(r)
        return r

    yield open_
    for r in opened:
        r.close()

//! The app schemas the tests use. Tests that exercise one policy in isolation (the
//! convergence and compare-and-set properties, schema upgrades) declare their own; these are
//! the shared ones.

use ferry_core::{ColumnType, DeleteRule, Policy, Schema, TableDecl, TableMode};

/// A device-side schema: an lww table with a counter (`todo`) and an `update_wins` table
/// with a counter (`note`).
pub fn local() -> Schema {
    Schema::new(1)
        .table(
            TableDecl::new("todo")
                .text_key("id")
                .text("title")
                .integer("done")
                .counter("votes")
                .text("list"),
        )
        .table(
            TableDecl::new("note")
                .text_key("id")
                .text("body")
                .counter("n")
                .delete_rule(DeleteRule::UpdateWins),
        )
}

/// The `note` table at app schema `version`: an `update_wins` table with a counter; version 2
/// adds the column `prio`.
pub fn note(version: u32) -> TableDecl {
    let note = TableDecl::new("note")
        .text_key("id")
        .text("body")
        .counter("n")
        .delete_rule(DeleteRule::UpdateWins);
    if version >= 2 {
        note.integer("prio")
    } else {
        note
    }
}

/// The relay tests' schema at `version` 1 or 2: a scoped lww/counter table (`todo`, scope
/// `list`), a global table (`tag`), an `update_wins` table (`note`), a scoped `update_wins`
/// table (`doc`, scope `owner`), a read-only table (`price`), a server-checked table
/// (`acct`) and a table with a `custom` column (`memo`). Version 2 adds `note.prio` and a
/// local-only table (`local_prefs`), for upgrades under traffic.
pub fn relay(version: u32) -> Schema {
    let s = Schema::new(version)
        .table(
            TableDecl::new("todo")
                .text_key("id")
                .text("list")
                .text("title")
                .integer("done")
                .counter("votes")
                .scope("list"),
        )
        .table(TableDecl::new("tag").text_key("id").text("name"))
        .table(note(version))
        .table(
            TableDecl::new("doc")
                .text_key("id")
                .text("owner")
                .text("body")
                .scope("owner")
                .delete_rule(DeleteRule::UpdateWins),
        )
        .table(
            TableDecl::new("price")
                .text_key("id")
                .integer("cents")
                .mode(TableMode::ReadOnly),
        )
        .table(
            TableDecl::new("acct")
                .text_key("id")
                .integer("balance")
                .text("holder")
                .mode(TableMode::ServerChecked),
        )
        .table(TableDecl::new("memo").text_key("id").column(
            "body",
            ColumnType::Text,
            Policy::Custom,
        ));
    if version >= 2 {
        s.migration(
            2,
            "CREATE TABLE IF NOT EXISTS local_prefs (k TEXT PRIMARY KEY, v TEXT)",
        )
    } else {
        s
    }
}

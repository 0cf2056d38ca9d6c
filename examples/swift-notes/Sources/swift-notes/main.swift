// swift-notes: the notes app of examples/kotlin-notes and examples/python-notes, in Swift.
// Works offline; `sync` exchanges changes with a relay (FERRY_RELAY, FERRY_TOKEN).
//
//   swift-notes --db notes.db add FOLDER TITLE [BODY]
//   swift-notes --db notes.db list
//   swift-notes --db notes.db like ID
//   swift-notes --db notes.db sync
import Ferry
import Foundation

func column(_ name: String, _ type: ColumnType = .text, _ policy: Policy = .lww, notNull: Bool = false) -> ColumnDecl {
    ColumnDecl(name: name, columnType: type, policy: policy, notNull: notNull, defaultValue: nil)
}

let schema = Schema(
    version: 1,
    tables: [
        TableDecl(
            name: "notes",
            columns: [column("id"), column("folder", notNull: true), column("title"),
                      column("body", .text, .custom), column("likes", .integer, .counter)],
            primaryKey: "id", mode: .multiWriter, deleteRule: .deleteWins, scopeColumn: "folder"
        ),
        TableDecl(name: "announcements", columns: [column("id"), column("text")],
                  primaryKey: "id", mode: .readOnly, deleteRule: .deleteWins, scopeColumn: nil),
    ],
    migrations: []
)

func usage() -> Never {
    FileHandle.standardError.write("usage: swift-notes --db PATH (add FOLDER TITLE [BODY] | list | like ID | sync)\n".data(using: .utf8)!)
    exit(2)
}

/// A note as the app sees it (rows decoded with `db.fetch(Note.self, sql)`).
struct Note: Decodable {
    let id: String
    let folder: String
    let title: String?
    let body: String?
    let likes: Int64
}

let args = Array(CommandLine.arguments.dropFirst())
guard args.count >= 3, args[0] == "--db" else { usage() }
let command = Array(args.dropFirst(2))

do {
    let db = try Replica.open(path: args[1], schema: schema)
    defer { try? db.closeDatabase() }
    switch command.first {
    case "add":
        guard command.count >= 3 else { usage() }
        let id = db.newId()
        let body: SqlValue = command.count > 3 ? .text(value: command[3]) : .null
        try db.write { tx in
            try tx.exec("INSERT INTO notes(id, folder, title, body) VALUES (?, ?, ?, ?)",
                        .text(value: id), .text(value: command[1]), .text(value: command[2]), body)
        }
        print("added \(id)")
    case "list":
        for n in try db.fetch(Note.self, "SELECT id, folder, title, body, likes FROM notes ORDER BY folder, title, id") {
            print("\(n.id)  [\(n.folder)] \(n.title ?? "")  \(n.body ?? "")  (\(n.likes) likes)")
        }
    case "like":
        guard command.count >= 2 else { usage() }
        if try db.exec("UPDATE notes SET likes = likes + 1 WHERE id = ?", .text(value: command[1])) == 0 {
            print("swift-notes: no note \(command[1])")
            exit(1)
        }
    case "sync":
        let env = ProcessInfo.processInfo.environment
        guard let token = env["FERRY_TOKEN"] else { usage() }
        let session = try db.connect(url: env["FERRY_RELAY"] ?? "ws://127.0.0.1:7070/sync") { token }
        let done = DispatchSemaphore(value: 0)
        Task {
            do {
                try await session.syncNow()
                let s = session.status()
                print("synced: cursor \(s.cursor), pending \(s.pending)")
            } catch {
                print("swift-notes: \(error)")
            }
            done.signal()
        }
        done.wait()
        session.disconnect()
    default:
        usage()
    }
} catch {
    print("swift-notes: \(error)")
    exit(1)
}

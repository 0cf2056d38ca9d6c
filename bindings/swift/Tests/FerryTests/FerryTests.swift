// Ferry's Swift surface against a real relay process, mirroring the Kotlin and Python suites.
// Run with `swift test` on a machine with Swift and the XCFramework built (docs/bindings.md);
// set FERRY_RELAY_BIN (a ferry-relay binary) and FERRY_NOTES_SCHEMA
// (bindings/tests/notes-schema.json). Not run on the Linux CI machine, which has no Swift.
import Foundation
import XCTest
@testable import Ferry

final class TestRelay {
    let dir: URL
    let config: URL
    let process = Process()
    let url: String
    let bin: String

    init() throws {
        let env = ProcessInfo.processInfo.environment
        guard let bin = env["FERRY_RELAY_BIN"], let schema = env["FERRY_NOTES_SCHEMA"] else {
            throw XCTSkip("set FERRY_RELAY_BIN and FERRY_NOTES_SCHEMA")
        }
        self.bin = bin
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-swift-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        config = dir.appendingPathComponent("relay.toml")
        let text = """
        listen = "127.0.0.1:0"
        data = "\(dir.appendingPathComponent("data").path)"
        schema = "\(schema)"
        [log]
        level = "warn"
        [auth]
        hs256_secret = "swift-binding-tests-secret-not-for-production"
        """
        try text.write(to: config, atomically: true, encoding: .utf8)
        process.executableURL = URL(fileURLWithPath: bin)
        process.arguments = ["--config", config.path, "serve"]
        let out = Pipe()
        process.standardOutput = out
        try process.run()
        var line = Data()
        while let byte = try out.fileHandleForReading.read(upToCount: 1), !byte.isEmpty, byte != Data([10]) {
            line.append(byte)
        }
        let addr = String(decoding: line, as: UTF8.self).split(separator: " ").last.map(String.init) ?? ""
        url = "ws://\(addr)/sync"
    }

    func token(_ sub: String, write: String = "*") throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: bin)
        p.arguments = ["--config", config.path, "token", "--sub", sub, "--read", "*", "--write", write, "--ttl", "1h"]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        p.waitUntilExit()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    deinit {
        process.terminate()
        process.waitUntilExit()
        try? FileManager.default.removeItem(at: dir)
    }
}

func notesSchema() -> Schema {
    func col(_ name: String, _ type: ColumnType = .text, _ policy: Policy = .lww, notNull: Bool = false) -> ColumnDecl {
        ColumnDecl(name: name, columnType: type, policy: policy, notNull: notNull, defaultValue: nil)
    }
    return Schema(
        version: 1,
        tables: [
            TableDecl(
                name: "notes",
                columns: [col("id"), col("folder", notNull: true), col("title"), col("body", .text, .custom), col("likes", .integer, .counter)],
                primaryKey: "id", mode: .multiWriter, deleteRule: .deleteWins, scopeColumn: "folder"
            ),
            TableDecl(
                name: "announcements", columns: [col("id"), col("text")],
                primaryKey: "id", mode: .readOnly, deleteRule: .deleteWins, scopeColumn: nil
            ),
        ],
        migrations: []
    )
}

final class FerryTests: XCTestCase {
    var relay: TestRelay!
    var dir: URL!

    override func setUpWithError() throws {
        relay = try TestRelay()
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-swift-db-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        relay = nil
        try? FileManager.default.removeItem(at: dir)
    }

    func open(_ name: String) throws -> Replica {
        try Replica.open(path: dir.appendingPathComponent(name).path, schema: notesSchema())
    }

    func session(_ db: Replica, _ sub: String, write: String = "*") throws -> SyncSession {
        let token = try relay.token(sub, write: write)
        return try db.connect(url: relay.url, options: SyncOptions(backoffMinMs: 50, backoffMaxMs: 500)) { token }
    }

    func pause(_ s: SyncSession) async {
        s.pause()
        _ = await s.waitFor { $0.state == .paused }
    }

    func testAWriteInOneReplicaAppearsInTheOthersWatch() async throws {
        let a = try open("a.db"), b = try open("b.db")
        let sa = try session(a, "alice"), sb = try session(b, "bob")
        let id = newId()
        try a.write { tx in
            try tx.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'home', ?)", .text(value: id), "milk")
            XCTAssertEqual(try tx.select("SELECT count(*) FROM notes").rows, [[1]])
        }
        try await sa.syncNow()
        var seen: QueryResult?
        for try await rows in b.watchStream("SELECT id, title FROM notes") where !rows.rows.isEmpty {
            seen = rows
            break
        }
        XCTAssertEqual(seen?.rows, [[.text(value: id), "milk"]])
        try await sb.syncNow()
        let verification = try await sb.verify()
        XCTAssertTrue(verification.matches)
        XCTAssertEqual(try a.checksum(), try b.checksum())
    }

    func testASwiftResolverDecidesARealConflict() async throws {
        let a = try open("a.db"), b = try open("b.db")
        final class Calls: @unchecked Sendable { var inputs: [ConflictInput] = []; let lock = NSLock() }
        let calls = Calls()
        try b.setResolver(table: "notes") { c in
            calls.lock.lock(); calls.inputs.append(c); calls.lock.unlock()
            return .value(value: .text(value: "\(c.local.text ?? "") & \(c.remote.text ?? "")"))
        }
        let sa = try session(a, "alice"), sb = try session(b, "bob")
        let id = SqlValue.text(value: newId())
        try a.exec("INSERT INTO notes(id, folder, title, body) VALUES (?, 'home', 't', 'draft')", id)
        try await sa.syncNow()
        try await sb.syncNow()
        await pause(sa)
        await pause(sb)
        try a.exec("UPDATE notes SET body = 'from a' WHERE id = ?", id)
        try b.exec("UPDATE notes SET body = 'from b' WHERE id = ?", id)
        sa.resume()
        try await sa.syncNow()
        sb.resume()
        try await sb.syncNow()
        try await sb.syncNow()
        try await sa.syncNow()
        XCTAssertEqual(calls.inputs.count, 1)
        XCTAssertEqual(calls.inputs.first?.local, "from b")
        XCTAssertEqual(calls.inputs.first?.remote, "from a")
        for r in [a, b] {
            XCTAssertEqual(try r.select("SELECT body FROM notes WHERE id = ?", id).rows, [["from b & from a"]])
        }
        XCTAssertEqual(try b.conflicts().first?.policy, "custom")
    }

    func testErrorsAreTypedSwiftErrors() async throws {
        let a = try open("a.db")
        XCTAssertThrowsError(try a.exec("SELEC nonsense")) { e in
            guard case FerryError.InvalidInput = e else { return XCTFail("\(e)") }
        }
        XCTAssertThrowsError(try a.exec("INSERT INTO announcements(id, text) VALUES ('1', 'hi')")) { e in
            guard case let FerryError.ReadOnlyTable(table) = e else { return XCTFail("\(e)") }
            XCTAssertEqual(table, "announcements")
        }
        // A write outside the token's write scopes is refused by the relay and quarantined:
        // the uploads behind it go on, and the app decides.
        let s = try session(a, "mallory", write: "mine")
        try a.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'someone-else', 'x')", .text(value: newId()))
        try await s.syncNow()
        XCTAssertNil(s.status().refused)
        let q = try a.quarantined()
        XCTAssertEqual(q.count, 1)
        XCTAssertEqual(q[0].code, .forbidden)
        XCTAssertThrowsError(try a.discardQuarantined(id: q[0].id)) { e in
            guard case FerryError.CannotDiscard = e else { return XCTFail("\(e)") }
        }
        try a.closeDatabase()
        XCTAssertThrowsError(try a.select("SELECT 1")) { e in
            guard case FerryError.Closed = e else { return XCTFail("\(e)") }
        }
    }

    func testWriteRollsBackWhenTheBlockThrows() throws {
        struct ChangedMyMind: Error {}
        let a = try open("a.db")
        XCTAssertThrowsError(try a.write { tx in
            try tx.exec("INSERT INTO notes(id, folder) VALUES ('1', 'home')")
            throw ChangedMyMind()
        })
        XCTAssertEqual(try a.select("SELECT count(*) FROM notes").rows, [[0]])
        XCTAssertEqual(try a.pendingCount(), 0)
    }

    struct Note: Decodable, Equatable, Sendable {
        let id: String
        let title: String?
        let likes: Int64
    }

    func testRowsDecodeIntoSwiftTypesAndCallsRunOffTheActor() async throws {
        let a = try open("t.db")
        try await a.executeAsync("INSERT INTO notes(id, folder, title, likes) VALUES ('n1', 'home', 'milk', 3)")
        _ = try await a.writeAsync { tx in try tx.exec("INSERT INTO notes(id, folder, likes) VALUES ('n2', 'home', 0)") }
        let notes = try await a.fetchAsync(Note.self, "SELECT id, title, likes FROM notes ORDER BY id")
        XCTAssertEqual(notes, [Note(id: "n1", title: "milk", likes: 3), Note(id: "n2", title: nil, likes: 0)])
        let row = try await a.rowsAsync("SELECT id, likes FROM notes WHERE id = ?", ["n1"])[0]
        XCTAssertEqual(row["id"], .text(value: "n1"))
        XCTAssertEqual(row[1], .integer(value: 3))
        XCTAssertNil(row["nope"])
        // A missing column and a NULL in a non-optional property are errors naming the column.
        XCTAssertThrowsError(try a.fetch(Note.self, "SELECT id, likes FROM notes"))
        XCTAssertThrowsError(try a.fetch(Note.self, "SELECT id, title, NULL AS likes FROM notes"))
        let pending: Int64 = try a.pendingCount()
        XCTAssertEqual(pending, 2)
    }

    func testFerrysLogRecordsReachTheApp() throws {
        final class Records: @unchecked Sendable {
            let lock = NSLock()
            var all: [LogRecord] = []
            func add(_ r: LogRecord) { lock.lock(); all.append(r); lock.unlock() }
            var snapshot: [LogRecord] { lock.lock(); defer { lock.unlock() }; return all }
        }
        let got = Records()
        try setLogger(level: .debug) { got.add($0) }
        defer { try? setLogger(logger: nil, level: .info) }
        _ = try open("logged.db")
        XCTAssertTrue(got.snapshot.contains { $0.level == .debug && $0.message.contains("replica opened") })
        try setLogger(logger: nil, level: .warn)
        let count = got.snapshot.count
        _ = try open("quiet.db")
        XCTAssertEqual(got.snapshot.count, count)
    }

    func testAnAsyncFunctionSuppliesTheToken() async throws {
        let a = try open("fetch.db")
        let token = try relay.token("alice")
        let s = try a.connect(url: relay.url, options: SyncOptions(backoffMinMs: 50, backoffMaxMs: 200)) {
            try await Task.sleep(nanoseconds: 10_000_000) // e.g. a refresh over the network
            return token
        }
        try a.exec("INSERT INTO notes(id, folder, title) VALUES ('1', 'home', 'x')")
        try await s.syncNow()
        XCTAssertEqual(try a.pendingCount(), 0)
        s.disconnect()
    }

    func testTheDatabaseStatusSpansSessions() async throws {
        let a = try open("a.db"), b = try open("b.db")
        let sa = try session(a, "alice")
        try a.exec("INSERT INTO notes(id, folder, title) VALUES ('1', 'home', 'milk')")
        try await sa.syncNow()
        XCTAssertEqual(try b.syncStatus().state, .stopped)
        XCTAssertFalse(try b.syncStatus().hasSynced)
        let sb = try session(b, "bob")
        try await b.waitForFirstSync()
        sb.disconnect()
        for await status in try b.syncStatusStream() where status.state == .stopped {
            XCTAssertTrue(status.hasSynced)
            XCTAssertNil(status.downloadError)
            break
        }
        try b.disconnectAndClear()
        XCTAssertFalse(try b.syncStatus().hasSynced)
        sa.disconnect()
    }

    func testLogoutClearsTheReplica() throws {
        let b = try open("b.db")
        try b.exec("INSERT INTO notes(id, folder, title) VALUES ('1', 'home', 'milk')")
        let before = try b.replicaId()
        try b.disconnectAndClear()
        XCTAssertEqual(try b.select("SELECT count(*) FROM notes").rows, [[0]])
        XCTAssertNotEqual(try b.replicaId(), before)
        XCTAssertEqual(try b.pendingCount(), 0)
    }

    func testClosingReleasesTheDatabaseAndReopenWorks() throws {
        let path = dir.appendingPathComponent("c.db").path
        let id = SqlValue.text(value: newId())
        do {
            let r = try Replica.open(path: path, schema: notesSchema())
            try r.exec("INSERT INTO notes(id, folder, title) VALUES (?, 'home', 'kept')", id)
            try r.closeDatabase()
            try r.closeDatabase()
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: path + "-wal"))
        let r = try Replica.open(path: path, schema: notesSchema())
        XCTAssertEqual(try r.select("SELECT title FROM notes WHERE id = ?", id).rows, [["kept"]])
    }
}

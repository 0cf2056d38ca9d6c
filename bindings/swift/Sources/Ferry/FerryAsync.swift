// Idiomatic Swift over the generated bindings (Generated/Ferry.swift, from ferry-ffi).
//
// Kept small: the generated code already gives `async throws` functions, structs, enums and a
// `FerryError` enum. This file adds a `write { }` that commits or rolls back, AsyncStreams for
// watched queries, changes and sync status, closures for the foreign protocols, and literals
// for SqlValue.
import Foundation

extension Replica {
    /// Runs `body` in one write transaction: committed if it returns (everything it wrote
    /// becomes one change set), rolled back if it throws.
    public func write<T>(_ body: (WriteTransaction) throws -> T) throws -> T {
        let tx = try beginWrite()
        do {
            let result = try body(tx)
            try tx.commit()
            return result
        } catch {
            try? tx.rollback()
            throw error
        }
    }

    /// `execute` with a variadic parameter list.
    @discardableResult
    public func exec(_ sql: String, _ params: SqlValue...) throws -> Int64 {
        try execute(sql: sql, params: params)
    }

    /// `query` with a variadic parameter list.
    public func select(_ sql: String, _ params: SqlValue...) throws -> QueryResult {
        try query(sql: sql, params: params)
    }

    /// The results of `sql` now and after every commit that changes them. Iterating starts
    /// the watch; ending the iteration cancels it. Only the newest results are buffered.
    public func watchStream(_ sql: String, _ params: [SqlValue] = []) -> AsyncThrowingStream<QueryResult, Error> {
        AsyncThrowingStream(bufferingPolicy: .bufferingNewest(1)) { continuation in
            do {
                let sub = try self.watch(sql: sql, params: params, listener: QueryClosure { continuation.yield($0) })
                continuation.onTermination = { _ in sub.cancel() }
            } catch {
                continuation.finish(throwing: error)
            }
        }
    }

    /// Every commit to synced tables (local, foreign or remote), none dropped.
    public func changes() -> AsyncStream<ChangeEvent> {
        AsyncStream(bufferingPolicy: .unbounded) { continuation in
            let sub = self.subscribe(listener: ChangeClosure { continuation.yield($0) })
            continuation.onTermination = { _ in sub.cancel() }
        }
    }

    /// Every conflict detected while merging (conflict log entries as written), none dropped.
    public func conflictStream() -> AsyncStream<ConflictRecord> {
        AsyncStream(bufferingPolicy: .unbounded) { continuation in
            let sub = self.subscribe(listener: ConflictClosure { continuation.yield($0) })
            continuation.onTermination = { _ in sub.cancel() }
        }
    }

    /// Registers `resolve` for the `custom` columns of `table`.
    public func setResolver(table: String, _ resolve: @escaping @Sendable (ConflictInput) -> Resolution) throws {
        try setResolver(table: table, resolver: ResolverClosure(resolve))
    }

    /// Connects with an `async` token source, awaited before every connection attempt (e.g. to
    /// refresh the token over the network; it may take up to 60 s).
    public func connect(url: String, options: SyncOptions? = nil, fetchToken: @escaping @Sendable () async throws -> String) throws -> SyncSession {
        try connectFetching(url: url, fetcher: FetcherClosure(fetchToken), options: options)
    }

    /// Connects with a closure as the token provider (called before every connection attempt,
    /// on a background thread).
    public func connect(url: String, options: SyncOptions? = nil, token: @escaping @Sendable () throws -> String) throws -> SyncSession {
        try connect(url: url, tokens: TokenClosure(token), options: options)
    }
}

extension WriteTransaction {
    /// `execute` with a variadic parameter list.
    @discardableResult
    public func exec(_ sql: String, _ params: SqlValue...) throws -> Int64 {
        try execute(sql: sql, params: params)
    }

    /// `query` with a variadic parameter list.
    public func select(_ sql: String, _ params: SqlValue...) throws -> QueryResult {
        try query(sql: sql, params: params)
    }
}

extension Replica {
    /// The replica's sync status now and on every change of any of its sessions (across
    /// disconnects and reconnects); only the newest is buffered. What a status bar observes.
    public func syncStatusStream() throws -> AsyncStream<SyncStatus> {
        // The build closure runs at once, inside `init`: a failure to observe (a closed
        // replica) is thrown from here.
        var failure: Error?
        let stream = AsyncStream<SyncStatus>(bufferingPolicy: .bufferingNewest(1)) { continuation in
            do {
                let sub = try self.observeSyncStatus(listener: StatusClosure { continuation.yield($0) })
                continuation.onTermination = { _ in sub.cancel() }
            } catch {
                failure = error
                continuation.finish()
            }
        }
        if let failure { throw failure }
        return stream
    }

    /// Waits until the replica has synced completely once (`hasSynced`), in any session.
    public func waitForFirstSync() async throws {
        for await status in try syncStatusStream() where status.hasSynced {
            return
        }
    }
}

extension Schema {
    /// The schema as the relay's `schema.json` (the same names as these records).
    public func toJson() throws -> String { try schemaToJson(schema: self) }

    /// A schema read from the relay's JSON form.
    public static func fromJson(_ json: String) throws -> Schema { try schemaFromJson(json: json) }
}

extension SyncSession {
    /// The sync status now and on every change; only the newest is buffered.
    public func statusStream() -> AsyncStream<SyncStatus> {
        AsyncStream(bufferingPolicy: .bufferingNewest(1)) { continuation in
            let sub = self.observe(listener: StatusClosure { continuation.yield($0) })
            continuation.onTermination = { _ in sub.cancel() }
        }
    }

    /// Waits until the status satisfies `condition`.
    public func waitFor(_ condition: (SyncStatus) -> Bool) async -> SyncStatus? {
        for await status in statusStream() where condition(status) {
            return status
        }
        return nil
    }
}

extension SqlValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral,
    ExpressibleByFloatLiteral, ExpressibleByNilLiteral, ExpressibleByBooleanLiteral {
    public init(stringLiteral value: String) { self = .text(value: value) }
    public init(integerLiteral value: Int64) { self = .integer(value: value) }
    public init(floatLiteral value: Double) { self = .real(value: value) }
    public init(nilLiteral: ()) { self = .null }
    public init(booleanLiteral value: Bool) { self = .integer(value: value ? 1 : 0) }

    /// The text inside, if it is text.
    public var text: String? {
        if case let .text(value) = self { return value }
        return nil
    }

    /// The integer inside, if it is an integer.
    public var integer: Int64? {
        if case let .integer(value) = self { return value }
        return nil
    }
}

/// Sends Ferry's log records at `level` and above to `log` (called on Ferry's threads: hand
/// them to `os_log` / `Logger`). `setLogger(logger: nil, level:)` stops them.
public func setLogger(level: LogLevel = .info, _ log: @escaping @Sendable (LogRecord) -> Void) throws {
    try setLogger(logger: LoggerClosure(log), level: level)
}

final class LoggerClosure: LogSink, @unchecked Sendable {
    let f: @Sendable (LogRecord) -> Void
    init(_ f: @escaping @Sendable (LogRecord) -> Void) { self.f = f }
    func log(record: LogRecord) throws { f(record) }
}

final class QueryClosure: QueryListener, @unchecked Sendable {
    let f: (QueryResult) -> Void
    init(_ f: @escaping (QueryResult) -> Void) { self.f = f }
    func onRows(rows: QueryResult) throws { f(rows) }
}

final class ChangeClosure: ChangeListener, @unchecked Sendable {
    let f: (ChangeEvent) -> Void
    init(_ f: @escaping (ChangeEvent) -> Void) { self.f = f }
    func onChange(event: ChangeEvent) throws { f(event) }
    func onConflict(conflict: ConflictRecord) throws {}
}

final class ConflictClosure: ChangeListener, @unchecked Sendable {
    let f: (ConflictRecord) -> Void
    init(_ f: @escaping (ConflictRecord) -> Void) { self.f = f }
    func onChange(event: ChangeEvent) throws {}
    func onConflict(conflict: ConflictRecord) throws { f(conflict) }
}

final class StatusClosure: SyncStatusListener, @unchecked Sendable {
    let f: (SyncStatus) -> Void
    init(_ f: @escaping (SyncStatus) -> Void) { self.f = f }
    func onStatus(status: SyncStatus) throws { f(status) }
}

final class ResolverClosure: ConflictResolver, @unchecked Sendable {
    let f: @Sendable (ConflictInput) -> Resolution
    init(_ f: @escaping @Sendable (ConflictInput) -> Resolution) { self.f = f }
    func resolve(conflict: ConflictInput) throws -> Resolution { f(conflict) }
}

final class FetcherClosure: TokenFetcher, @unchecked Sendable {
    let f: @Sendable () async throws -> String
    init(_ f: @escaping @Sendable () async throws -> String) { self.f = f }
    func fetchToken() async throws -> String { try await f() }
}

final class TokenClosure: TokenProvider, @unchecked Sendable {
    let f: @Sendable () throws -> String
    init(_ f: @escaping @Sendable () throws -> String) { self.f = f }
    func token() throws -> String { try f() }
}

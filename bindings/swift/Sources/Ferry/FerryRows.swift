// Typed rows and async calls over the generated bindings.
//
// A query crosses the FFI as column names plus rows of SqlValue. Apps want `row["title"]` and
// their own `Decodable` types, as with GRDB: `try db.fetch(Note.self, "SELECT ...")` decodes
// each row into a `Note` whose properties are the result's columns (a missing column, a NULL
// in a non-optional property or another type is a `DecodingError` naming the column). The
// `async` forms run the call on a detached task, off the caller's actor, so the main actor
// never waits on Ferry's lock; their transaction bodies are synchronous closures, so no
// transaction stays open across a suspension.
import Foundation

/// One result row: values by column name or index.
public struct Row: Sendable {
    /// The result's column names, in order.
    public let columns: [String]
    /// The values, in column order.
    public let values: [SqlValue]
    let index: [String: Int]

    /// The value of `column`, or nil when the result has no such column.
    public subscript(_ column: String) -> SqlValue? {
        index[column].map { values[$0] }
    }

    /// The value at `i` (0-based).
    public subscript(_ i: Int) -> SqlValue {
        values[i]
    }
}

extension QueryResult {
    /// The rows as `Row`s (a repeated column name answers with its first occurrence).
    public var typedRows: [Row] {
        let index = Dictionary(columns.enumerated().map { ($0.element, $0.offset) }, uniquingKeysWith: { first, _ in first })
        return rows.map { Row(columns: columns, values: $0, index: index) }
    }

    /// Each row decoded into `T` (its properties named after the columns).
    public func decode<T: Decodable>(_ type: T.Type) throws -> [T] {
        try typedRows.map { try T(from: RowDecoder(row: $0)) }
    }
}

extension Replica {
    /// Runs `sql` and decodes each row into `T`.
    public func fetch<T: Decodable>(_ type: T.Type, _ sql: String, _ params: [SqlValue] = []) throws -> [T] {
        try query(sql: sql, params: params).decode(type)
    }

    /// `fetch` off the caller's actor.
    public func fetchAsync<T: Decodable & Sendable>(_ type: T.Type, _ sql: String, _ params: [SqlValue] = []) async throws -> [T] {
        try await Task.detached { try self.fetch(type, sql, params) }.value
    }

    /// `query` off the caller's actor, rows typed.
    public func rowsAsync(_ sql: String, _ params: [SqlValue] = []) async throws -> [Row] {
        try await Task.detached { try self.query(sql: sql, params: params).typedRows }.value
    }

    /// `execute` off the caller's actor; returns rows changed.
    @discardableResult
    public func executeAsync(_ sql: String, _ params: [SqlValue] = []) async throws -> Int64 {
        try await Task.detached { try self.execute(sql: sql, params: params) }.value
    }

    /// `write` off the caller's actor. `body` is synchronous: the transaction never stays
    /// open across a suspension.
    public func writeAsync<T: Sendable>(_ body: @escaping @Sendable (WriteTransaction) throws -> T) async throws -> T {
        try await Task.detached { try self.write(body) }.value
    }
}

extension WriteTransaction {
    /// Runs `sql` inside this transaction (seeing its writes) and decodes each row into `T`.
    public func fetch<T: Decodable>(_ type: T.Type, _ sql: String, _ params: [SqlValue] = []) throws -> [T] {
        try query(sql: sql, params: params).decode(type)
    }
}

/// Decodes one row into a keyed `Decodable` type, a property per column.
struct RowDecoder: Decoder {
    let row: Row
    var codingPath: [CodingKey] { [] }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        KeyedDecodingContainer(RowContainer<Key>(row: row))
    }

    func unkeyedContainer() throws -> UnkeyedDecodingContainer {
        throw RowDecoder.notKeyed()
    }

    func singleValueContainer() throws -> SingleValueDecodingContainer {
        throw RowDecoder.notKeyed()
    }

    static func notKeyed() -> DecodingError {
        DecodingError.typeMismatch(Row.self, DecodingError.Context(
            codingPath: [], debugDescription: "a row decodes into a type with a property per column"))
    }
}

struct RowContainer<Key: CodingKey>: KeyedDecodingContainerProtocol {
    let row: Row
    var codingPath: [CodingKey] { [] }
    var allKeys: [Key] { row.columns.compactMap { Key(stringValue: $0) } }

    func contains(_ key: Key) -> Bool {
        row[key.stringValue] != nil
    }

    private func value(_ key: Key) throws -> SqlValue {
        guard let v = row[key.stringValue] else {
            throw DecodingError.keyNotFound(key, DecodingError.Context(
                codingPath: [key], debugDescription: "no column '\(key.stringValue)'; columns: \(row.columns.joined(separator: ", "))"))
        }
        return v
    }

    private func mismatch(_ type: Any.Type, _ key: Key, _ v: SqlValue) -> DecodingError {
        DecodingError.typeMismatch(type, DecodingError.Context(
            codingPath: [key], debugDescription: "column '\(key.stringValue)' holds \(v)"))
    }

    private func integer<I: FixedWidthInteger>(_ type: I.Type, _ key: Key) throws -> I {
        let v = try value(key)
        guard case let .integer(n) = v, let i = I(exactly: n) else { throw mismatch(type, key, v) }
        return i
    }

    func decodeNil(forKey key: Key) throws -> Bool {
        if case .null = try value(key) { return true }
        return false
    }

    func decode(_ type: Bool.Type, forKey key: Key) throws -> Bool { try integer(Int64.self, key) != 0 }

    func decode(_ type: String.Type, forKey key: Key) throws -> String {
        let v = try value(key)
        guard case let .text(s) = v else { throw mismatch(type, key, v) }
        return s
    }

    func decode(_ type: Double.Type, forKey key: Key) throws -> Double {
        let v = try value(key)
        switch v {
        case let .real(d): return d
        case let .integer(n): return Double(n)
        default: throw mismatch(type, key, v)
        }
    }

    func decode(_ type: Float.Type, forKey key: Key) throws -> Float { Float(try decode(Double.self, forKey: key)) }
    func decode(_ type: Int.Type, forKey key: Key) throws -> Int { try integer(type, key) }
    func decode(_ type: Int8.Type, forKey key: Key) throws -> Int8 { try integer(type, key) }
    func decode(_ type: Int16.Type, forKey key: Key) throws -> Int16 { try integer(type, key) }
    func decode(_ type: Int32.Type, forKey key: Key) throws -> Int32 { try integer(type, key) }
    func decode(_ type: Int64.Type, forKey key: Key) throws -> Int64 { try integer(type, key) }
    func decode(_ type: UInt.Type, forKey key: Key) throws -> UInt { try integer(type, key) }
    func decode(_ type: UInt8.Type, forKey key: Key) throws -> UInt8 { try integer(type, key) }
    func decode(_ type: UInt16.Type, forKey key: Key) throws -> UInt16 { try integer(type, key) }
    func decode(_ type: UInt32.Type, forKey key: Key) throws -> UInt32 { try integer(type, key) }
    func decode(_ type: UInt64.Type, forKey key: Key) throws -> UInt64 { try integer(type, key) }

    func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
        let v = try value(key)
        if case let .blob(data) = v, let t = data as? T { return t }
        if case let .text(s) = v, let t = s as? T { return t }
        throw mismatch(type, key, v)
    }

    func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws -> KeyedDecodingContainer<NestedKey> {
        throw RowDecoder.notKeyed()
    }

    func nestedUnkeyedContainer(forKey key: Key) throws -> UnkeyedDecodingContainer {
        throw RowDecoder.notKeyed()
    }

    func superDecoder() throws -> Decoder { RowDecoder(row: row) }
    func superDecoder(forKey key: Key) throws -> Decoder { RowDecoder(row: row) }
}

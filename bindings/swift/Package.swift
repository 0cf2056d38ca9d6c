// swift-tools-version:5.9
// Ferry for Swift: the generated UniFFI bindings (Sources/Ferry/Generated, written by
// scripts/bindings-build), a small async layer (Sources/Ferry/FerryAsync.swift) and the Rust
// library as an XCFramework (FerryFFI.xcframework, built on a Mac by
// scripts/build-xcframework). See docs/bindings.md.
import PackageDescription

let package = Package(
    name: "Ferry",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "Ferry", targets: ["Ferry"]),
    ],
    targets: [
        .binaryTarget(name: "FerryFFI", path: "FerryFFI.xcframework"),
        .target(name: "Ferry", dependencies: ["FerryFFI"], path: "Sources/Ferry"),
        .testTarget(name: "FerryTests", dependencies: ["Ferry"], path: "Tests/FerryTests"),
    ]
)

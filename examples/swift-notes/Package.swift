// swift-tools-version:5.9
// swift-notes: a command-line notes app on Ferry's Swift package (bindings/swift).
// Build on a machine with Swift after scripts/build-xcframework: `swift run swift-notes --db notes.db list`.
import PackageDescription

let package = Package(
    name: "swift-notes",
    platforms: [.macOS(.v12)],
    dependencies: [.package(path: "../../bindings/swift")],
    targets: [
        .executableTarget(name: "swift-notes", dependencies: [.product(name: "Ferry", package: "swift")]),
    ]
)

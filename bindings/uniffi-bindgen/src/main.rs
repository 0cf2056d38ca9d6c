//! UniFFI's `uniffi-bindgen` command, built from the workspace so that the generator always
//! matches the `uniffi` version `ferry-ffi` was compiled with (a mismatch produces foreign
//! code whose checksums the library rejects at load time).
//!
//! The binary is named `ferry-uniffi-bindgen`, not `uniffi-bindgen`: maturin runs any workspace
//! binary called `uniffi-bindgen` with `cargo run` (an unoptimized second build of the
//! generator), while it takes a `uniffi-bindgen` found on `PATH` as is — `scripts/python-wheel`
//! puts this release build there under that name.
//!
//! `cargo run --release -p ferry-uniffi-bindgen -- generate target/release/libferry_ffi.so --language kotlin --out-dir out`

fn main() {
    uniffi::uniffi_bindgen_main()
}

//! UniFFI's `uniffi-bindgen` command, built from the workspace so that the generator always
//! matches the `uniffi` version `ferry-ffi` was compiled with (a mismatch produces foreign
//! code whose checksums the library rejects at load time).
//!
//! `cargo run -p uniffi-bindgen -- generate target/release/libferry_ffi.so --language kotlin --out-dir out`

fn main() {
    uniffi::uniffi_bindgen_main()
}

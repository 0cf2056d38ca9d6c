//! Schema declaration: any JSON is refused with a clear error or opens a replica.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_fuzz::schema(data);
});

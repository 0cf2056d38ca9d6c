//! Change-set application: any sequence of (decoded) change sets is applied or refused with
//! an error; the replica never panics and stays usable and consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_fuzz::apply(data);
});

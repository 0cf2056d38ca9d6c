//! Frame decoding: any bytes from the network decode to a message or a clear error, never a
//! panic, and a decoded message re-encodes to bytes that decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_fuzz::frame(data);
});

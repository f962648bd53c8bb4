//! The SHA256SUMS parser: any bytes give an error or a table, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use terrapeak::registry::provider::Sha256Sums;

fuzz_target!(|data: &[u8]| {
    let _ = Sha256Sums::parse(data);
});

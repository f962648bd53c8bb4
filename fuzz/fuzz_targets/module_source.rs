//! Module source addresses (`X-Terraform-Get` and `{"location": ...}` values).
#![no_main]

use libfuzzer_sys::fuzz_target;
use terrapeak::registry::module::ModuleSource;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(source) = ModuleSource::parse(s) {
        let _ = source.served_as();
        let _ = source.subdir();
    }
});

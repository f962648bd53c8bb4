//! The configuration file: durations, sizes and every other typed key from arbitrary YAML, then
//! validation. Errors are fine; panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = serde_yaml::from_str::<terrapeak::config::Config>(s) {
        let _ = config.upstream_endpoints();
        let _ = config.listen_addr();
        let _ = config.metrics_addr();
    }
});

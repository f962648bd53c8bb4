//! An upstream download answer, parsed, checked and rewritten the way TerraPeak serves it:
//! never a panic, and the rewritten links always point at TerraPeak.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(links) = terrapeak::fuzzing::download_answer(data) {
        for link in links {
            assert!(link.starts_with("https://tp.example.com/artifacts/"), "{link}");
        }
    }
});

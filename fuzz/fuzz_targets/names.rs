//! Every path-segment newtype: whatever it accepts can never climb out of a folder or name
//! another host.
#![no_main]

use libfuzzer_sys::fuzz_target;
use terrapeak::registry::{
    Arch, FileName, Host, ModuleName, Namespace, Os, ProviderType, TargetSystem, Version,
};

fn safe(kind: &str, input: &str, accepted: &str) {
    assert!(!accepted.is_empty(), "{kind}: empty from {input:?}");
    assert!(accepted != "." && accepted != "..", "{kind}: {accepted:?}");
    for bad in ['/', '\\', '\0', '\n', '\r', '?', '#', '%'] {
        assert!(!accepted.contains(bad), "{kind}: {accepted:?} holds {bad:?}");
    }
}

macro_rules! check {
    ($s:expr, $($t:ty),*) => {
        $(if let Ok(v) = <$t>::try_from($s) {
            safe(stringify!($t), $s, v.as_str());
        })*
    };
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    check!(s, Namespace, ProviderType, ModuleName, TargetSystem, Version, Os, Arch, FileName);
    if let Ok(h) = Host::try_from(s) {
        safe("Host", s, h.as_str());
        assert!(!h.as_str().contains('@'), "Host {:?}", h.as_str());
    }
});

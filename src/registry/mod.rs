//! The registry protocols: validated names and document shapes. No I/O lives here.

pub mod constraints;
pub mod module;
pub mod names;
pub mod provider;
pub mod selection;
pub mod signature;

pub use names::{
    Arch, FileName, Host, ModuleAddress, ModuleName, NameError, Namespace, Os, Platform,
    ProviderName, ProviderType, TargetSystem, Version,
};

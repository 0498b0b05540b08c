//! `cloudtapd` and `cloudtapctl`: flag parsing, configuration loading and composition
//! of the library crates. Logic lives in the libraries; this crate only wires it up.

pub mod ctl;
pub mod daemon;
mod http_client;
pub mod paths;

//! The `c2m` binary's library: configuration, roles, and assembling roles into servers. `main`
//! only parses flags, loads configuration, starts telemetry and runs a command.

#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod client;
pub mod config;
pub mod role;

pub use config::Config;
pub use role::Role;

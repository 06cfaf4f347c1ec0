//! Helpers for the binary tests.

pub mod otlp;

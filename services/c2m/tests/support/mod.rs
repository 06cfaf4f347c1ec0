//! Helpers for the binary tests.

#![allow(dead_code)]

pub mod dev;
pub mod otlp;

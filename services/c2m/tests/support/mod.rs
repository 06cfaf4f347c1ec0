//! Helpers for the binary tests.

#![allow(dead_code)]

pub mod acme;
pub mod dev;
pub mod otlp;

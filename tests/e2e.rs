//! End-to-end tests: c2m booted in-process on ephemeral ports against real PostgreSQL and Redis,
//! driven over gRPC and HTTP the way its users drive it.

mod app_messaging;
mod apple;
mod config_plane;
mod console;
mod conversation_rules;
mod conversations;
mod deflection;
mod grpc;
mod handoff_engine;
mod mesh;
mod one_message;
mod rcs;
mod reports;
mod rest;
mod sandbox;
mod story;
mod unanswered;
mod watch;
mod webhook_fuzz;
mod webhooks;
mod whatsapp;
mod whatsapp_setup;

//! What the service's tests and its benchmark harness share, so that it is written once: real processes on
//! loopback ports (the service's binary, redis-server, a Redis Cluster), Sinch's side of a webhook callback
//! (signing, headers, bodies, posting) and a fake Sinch API.
//!
//! # Layout
//! - [`process`]: spawn a process and wait for the line saying it is ready; the service's binary.
//! - [`redis`]: one redis-server, plain or durable, that a test can kill and restart.
//! - [`cluster`]: a Redis Cluster of N masters, whose nodes a test can kill and restart.
//! - [`callback`]: callbacks as Sinch signs and sends them.
//! - [`fake_sinch`]: a scripted stand-in for Sinch's API and token endpoint.
//!
//! This crate never depends on the service crate: the service's tests depend on it, and a dependency back would
//! compile the library twice. So the signature here is an implementation independent of the service's own.
//! Every process it starts listens on 127.0.0.1 only and is killed when its handle is dropped.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod callback;
pub mod cluster;
pub mod fake_sinch;
pub mod process;
pub mod redis;

pub use callback::{
    CapabilityCallback, capability_body, post_signed, post_webhook, sign, signed_headers, unix_now, webhook_url,
};
pub use cluster::RedisCluster;
pub use fake_sinch::{Canned, FakeSinch, KEY_ID, KEY_SECRET, PROJECT, Recorded, basic_auth};
pub use process::{Binary, Log, Spawned, clock_offset, free_port, spawn_until};
pub use redis::RedisServer;

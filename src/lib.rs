//! nemoclaw: rebuild and recover NVIDIA NemoClaw sandboxes as a journaled, crash-safe
//! transactional state machine.
//!
//! Data flows one way: `cli → rebuild → engine + journal`, `rebuild → host + gateway`.
//! The engine and the journal know nothing about sandboxes.

pub mod cli;
pub mod engine;
pub mod exit;
pub mod gateway;
pub mod host;
pub mod journal;
pub mod names;
pub mod rebuild;
pub mod util;

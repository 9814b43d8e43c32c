//! The one integration-test binary: every test drives the real `nemoclaw` binary in child
//! processes against real files and a real SQLite journal.

mod common;

mod audit;
mod backups;
mod engine;
mod fakegw;
mod gateway;
mod host;
mod rebuild;
mod transcripts;

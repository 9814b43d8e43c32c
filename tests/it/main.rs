//! The one integration-test binary: every test drives the real `nemoclaw` binary in child
//! processes against real files and a real SQLite journal.

mod common;

mod audit;
mod backups;
mod commands;
mod engine;
mod evidence;
mod fakegw;
mod gateway;
mod host;
mod json;
mod power_loss;
mod readonly;
mod rebuild;
mod surface;
mod transcripts;

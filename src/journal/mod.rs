//! The SQLite journal: open, migrate, runs/steps/events, audit queries.

pub mod chain;

//! Integration tests: host.

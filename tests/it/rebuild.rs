//! Integration tests: rebuild.

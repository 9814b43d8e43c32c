//! Integration tests: gateway.

//! The rebuild saga: preflight classification, the concrete steps, NemoClaw's messages.

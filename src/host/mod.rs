//! NemoClaw host files: the registry, the onboard session, shields state and backups.
//! Everything here reads and writes files NemoClaw itself understands.

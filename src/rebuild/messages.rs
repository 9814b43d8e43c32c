//! Messages NemoClaw users and their scripts know. Kept verbatim (spec §4) in one place so a
//! test can pin every phrase.

/// `Rebuild sandbox '<n>'`.
pub fn header(n: &str) -> String {
    format!("Rebuild sandbox '{n}'")
}
/// Before the backup.
pub const BACKING_UP: &str = "Backing up sandbox state...";
/// Stale path, first line.
pub fn stale_absent(n: &str) -> String {
    format!("⚠ Sandbox '{n}' is registered locally but absent from the live OpenShell gateway.")
}
/// `status` of a sandbox its gateway does not have (a rebuild then takes the stale path).
pub fn missing_from_gateway(n: &str, gw: &str) -> String {
    format!("⚠ Sandbox '{n}' is registered locally but not present in the live gateway '{gw}'.")
}
/// Stale path, second line.
pub const STALE_NO_BACKUP: &str =
    "No live workspace state to back up — recreating from the preserved registry metadata.";
/// Before the delete.
pub const DELETING: &str = "Deleting old sandbox...";
/// Before the recreate.
pub const CREATING: &str = "Creating new sandbox with current image...";
/// Before the restore.
pub const RESTORING: &str = "Restoring workspace state...";
/// Success.
pub fn rebuilt(n: &str) -> String {
    format!("✓ Sandbox '{n}' rebuilt successfully")
}
/// Success after stale recovery.
pub const STALE_RECOVERED: &str =
    "Recovered from a stale registry entry — no prior workspace state was available to restore.";
/// Stale recreate failure, first line.
pub const RECREATE_FAILED: &str = "Recovery recreate failed.";
/// Stale recreate failure, second line.
pub const ENTRY_PRESERVED_RETRY: &str =
    "Your local registry entry has been preserved — you can retry once the issue above is fixed.";
/// Stale shields warning.
pub fn shields_unlocked_warning(n: &str) -> String {
    format!(
        "⚠ Shields were previously enabled but the recreated sandbox starts unlocked — run `nemoclaw {n} shields up` to restore lockdown."
    )
}
/// Refusal: registered against another gateway than the active one.
pub fn foreign_gateway(n: &str, gw: &str, active: &str) -> String {
    format!(
        "Sandbox '{n}' is registered against the NemoClaw gateway '{gw}', but the currently active OpenShell gateway is '{active}'. Your sandbox has NOT been removed."
    )
}
/// Refusal follow-up line.
pub const SWITCH_AND_RETRY: &str = "Switch gateways and retry:";
/// The command to switch.
pub fn select_cmd(gw: &str) -> String {
    format!("openshell gateway select {gw}")
}
/// Refusal: unknown live state.
pub fn could_not_confirm(n: &str) -> String {
    format!("Could not confirm live state of '{n}' (gateway not in a known-good state).")
}
/// Refusal follow-up.
pub const ENTRY_PRESERVED: &str =
    "Your local registry entry has been preserved — nothing was removed.";

/// After a failure before the point of no return, rolled back in the same command.
pub fn nothing_changed(name: &str, shields_locked: bool) -> String {
    format!(
        "Nothing was changed{}: the old sandbox and its registry entry are as they were. Fix the cause above and run the rebuild again: `nemoclaw {name} rebuild`.",
        if shields_locked { " (shields are locked again)" } else { "" }
    )
}

/// NemoClaw's non-fatal warning for a preset or custom policy that could not be re-applied.
pub fn preset_restore_failed(preset: &str, why: &str, name: &str) -> String {
    format!("⚠ Failed to restore presets: {preset}: {why}\n  Re-apply manually with: nemoclaw {name} policy-add")
}

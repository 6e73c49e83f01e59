//! The apply rules versions this build applies (see `portrait_core::rules`
//! for the protocol): `oldest()..=newest()`.
//!
//! Fault injection (the `fault-injection` build only): the environment
//! variable [`NEWEST_ENV`] makes the build claim another newest version, so
//! cluster tests can run "builds" of different versions side by side.

/// See the module docs.
#[cfg(feature = "fault-injection")]
pub const NEWEST_ENV: &str = "PORTRAIT_FAULT_APPLY_RULES_NEWEST";

/// The newest version this build applies.
pub fn newest() -> u32 {
    #[cfg(feature = "fault-injection")]
    {
        static CLAIMED: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
        if let Some(v) = *CLAIMED.get_or_init(|| std::env::var(NEWEST_ENV).ok().and_then(|v| v.parse().ok()))
        {
            return v;
        }
    }
    portrait_core::rules::NEWEST
}

/// The oldest version this build still applies.
pub fn oldest() -> u32 {
    portrait_core::rules::OLDEST.min(newest())
}

/// Whether this build applies by `version`, or why not.
pub fn check(version: u32) -> Result<(), String> {
    portrait_core::rules::check(version, oldest(), newest())
}

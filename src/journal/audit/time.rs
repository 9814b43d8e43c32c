//! Times and durations as the audit commands take and show them: `--since`/`--until` points,
//! `--older-than` durations, and the short human forms of both.

use super::AuditError;

/// Parse a duration into milliseconds: `7d`, `12h`, `30m`, `45s`, `2w`, `500ms`, and every
/// form `humantime` reads (`1min`, `1h30m`, `1h 30m`, `2days`).
pub fn parse_duration(s: &str) -> Result<i64, AuditError> {
    let bad = || AuditError::BadDuration { input: s.to_owned() };
    let d = humantime::parse_duration(s.trim()).map_err(|_| bad())?;
    i64::try_from(d.as_millis()).map_err(|_| bad())
}

/// Parse a point in time: RFC 3339, a UTC date (`2026-06-01`), or a duration meaning "that long
/// before `now_ms`". Returns milliseconds since the epoch.
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, AuditError> {
    let t = s.trim();
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(t) {
        return Ok(d.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        if let Some(dt) = d.and_hms_opt(0, 0, 0) {
            return Ok(dt.and_utc().timestamp_millis());
        }
    }
    match parse_duration(t) {
        Ok(ms) => Ok(now_ms - ms),
        Err(_) => Err(AuditError::BadTime { input: s.to_owned() }),
    }
}

/// A short human duration: `850ms`, `4.2s`, `3m12s`, `2h05m`, `3d04h`.
pub fn human_duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    } else if ms < 86_400_000 {
        format!("{}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    } else {
        format!("{}d{:02}h", ms / 86_400_000, (ms % 86_400_000) / 3_600_000)
    }
}

/// `3h ago`, `just now`, or `in 5m` (clock skew) relative to `now_ms`.
pub fn relative_time(at_ms: i64, now_ms: i64) -> String {
    let d = now_ms - at_ms;
    if d.abs() < 1_000 {
        return "just now".to_owned();
    }
    let unit = |ms: i64| {
        if ms < 60_000 {
            format!("{}s", ms / 1000)
        } else if ms < 3_600_000 {
            format!("{}m", ms / 60_000)
        } else if ms < 86_400_000 {
            format!("{}h", ms / 3_600_000)
        } else {
            format!("{}d", ms / 86_400_000)
        }
    };
    if d > 0 {
        format!("{} ago", unit(d))
    } else {
        format!("in {}", unit(-d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::days("7d", 7 * 86_400_000)]
    #[case::hours("12h", 12 * 3_600_000)]
    #[case::minutes("30m", 30 * 60_000)]
    #[case::seconds("45s", 45_000)]
    #[case::weeks("2w", 14 * 86_400_000)]
    #[case::millis("500ms", 500)]
    #[case::min("1min", 60_000)]
    #[case::compound("1h30m", 90 * 60_000)]
    #[case::spaced("1h 30m", 90 * 60_000)]
    #[case::words("2days", 2 * 86_400_000)]
    fn durations(#[case] s: &str, #[case] ms: i64) {
        assert_eq!(parse_duration(s).unwrap(), ms);
    }

    #[rstest]
    #[case::empty("")]
    #[case::no_unit("7")]
    #[case::bad_unit("7x")]
    #[case::words_only("soon")]
    #[case::negative("-7d")]
    #[case::overflow("99999999999999999d")]
    fn bad_durations(#[case] s: &str) {
        assert!(parse_duration(s).is_err(), "{s}");
    }

    #[test]
    fn times() {
        let now = 1_780_308_000_000;
        assert_eq!(parse_time("2026-06-01T10:00:00Z", now).unwrap(), now);
        assert_eq!(parse_time("2026-06-01T12:00:00+02:00", now).unwrap(), now);
        assert_eq!(parse_time("2026-06-01", now).unwrap(), now - 10 * 3_600_000);
        assert_eq!(parse_time("1h", now).unwrap(), now - 3_600_000);
        assert!(matches!(parse_time("yesterday", now), Err(AuditError::BadTime { .. })));
    }

    #[rstest]
    #[case(0, "just now")]
    #[case(5_000, "5s ago")]
    #[case(3 * 3_600_000 + 5, "3h ago")]
    #[case(-120_000, "in 2m")]
    #[case(2 * 86_400_000, "2d ago")]
    fn relative(#[case] age: i64, #[case] s: &str) {
        assert_eq!(relative_time(1_000_000_000 - age, 1_000_000_000), s);
    }

    #[rstest]
    #[case(850, "850ms")]
    #[case(4_200, "4.2s")]
    #[case(192_000, "3m12s")]
    #[case(7_500_000, "2h05m")]
    fn durations_human(#[case] ms: i64, #[case] s: &str) {
        assert_eq!(human_duration(ms), s);
    }
}

//! Human durations (`90s`, `15m`, `12h`, `30d`, `2w`) and instants given as
//! either an RFC 3339 date-time, a date, or a duration from now.

use time::{Date, Duration, OffsetDateTime, format_description::well_known::Rfc3339};

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: i64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 30s, 15m, 12h, 30d or 2w"))?;
    if n <= 0 {
        return Err(format!("duration `{s}` must be positive"));
    }
    let secs_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(format!("`{s}` has an unknown unit; use s, m, h, d or w")),
    };
    n.checked_mul(secs_per)
        .filter(|s| *s <= 100 * 365 * 86_400)
        .map(Duration::seconds)
        .ok_or_else(|| format!("duration `{s}` is too long"))
}

/// `2027-01-31T00:00:00Z`, `2027-01-31` (midnight UTC) or a duration from `now`.
pub fn parse_instant(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let date_fmt = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(d) = Date::parse(s, &date_fmt) {
        return Ok(d.midnight().assume_utc());
    }
    parse_duration(s)
        .map(|d| now + d)
        .map_err(|_| format!("`{s}` is neither a date (2027-01-31, RFC 3339) nor a duration (30d)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), Duration::days(30));
        assert_eq!(parse_duration("15m").unwrap(), Duration::minutes(15));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999d").is_err());
    }

    #[test]
    fn instants() {
        let now = OffsetDateTime::UNIX_EPOCH;
        assert_eq!(parse_instant("1d", now).unwrap(), now + Duration::days(1));
        assert_eq!(parse_instant("1970-01-03", now).unwrap(), now + Duration::days(2));
        assert!(parse_instant("yesterday", now).is_err());
    }
}

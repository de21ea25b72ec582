//! Calendar arithmetic for instants (Unix ms, UTC): ISO 8601 text for the public API, the
//! original API's `yyyy.mm.dd` dates, and parsing of client-given instants. Proleptic
//! Gregorian, UTC only (stored instants are UTC; clients convert for display).

/// Days since 1970-01-01 to (year, month, day).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) to days since 1970-01-01.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The parts of an instant: (year, month, day, hour, minute, second, millisecond).
fn parts(ms: i64) -> (i64, u32, u32, i64, i64, i64, i64) {
    let seconds = ms.div_euclid(1000);
    let days = seconds.div_euclid(86_400);
    let rest = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    (
        year,
        month,
        day,
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        ms.rem_euclid(1000),
    )
}

/// `2024-06-11T10:00:00.000Z`.
pub fn iso_utc(ms: i64) -> String {
    let (year, month, day, hour, minute, second, milli) = parts(ms);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z")
}

/// `2024-06-11 10:00:00 UTC`, for people.
pub fn time_text(ms: i64) -> String {
    let (year, month, day, hour, minute, second, _) = parts(ms);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02} UTC")
}

/// The last day an expiry instant leaves valid, for people: a licence expiring at
/// `2032-01-01 00:00 UTC` is `valid through 2031-12-31 (UTC)`.
pub fn valid_through(expires_at_ms: i64) -> String {
    let (year, month, day, ..) = parts(expires_at_ms.saturating_sub(1));
    format!("valid through {year:04}-{month:02}-{day:02} (UTC)")
}

/// The original API's date and time: `2024.06.11 10:00:00`.
pub fn legacy_time(ms: i64) -> String {
    let (year, month, day, hour, minute, second, _) = parts(ms);
    format!("{year:04}.{month:02}.{day:02} {hour:02}:{minute:02}:{second:02}")
}

/// A stored date of birth (`yyyy-mm-dd`) as the original API writes it (`yyyy.mm.dd`).
pub fn legacy_date(date: &str) -> String {
    date.replace('-', ".")
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff]Z` (UTC only; an offset other than `Z` is refused so an
/// instant is never silently shifted). None when it is not such an instant.
pub fn parse_iso_utc(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    if bytes.len() < 20 || !text.is_ascii() || !text.ends_with('Z') {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(at, c)| bytes[at] != c) {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let milli = match &text[19..text.len() - 1] {
        "" => 0,
        fraction if fraction.len() >= 2 && fraction.len() <= 4 && fraction.starts_with('.') => {
            let digits = &fraction[1..];
            let value = number(20..20 + digits.len())?;
            value * 10i64.pow(3 - digits.len() as u32)
        }
        _ => return None,
    };
    let month_u = u32::try_from(month).ok()?;
    let day_u = u32::try_from(day).ok()?;
    if !(1..=12).contains(&month_u) || day_u < 1 || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = days_from_civil(year, month_u, day_u);
    // Refuse 2023-02-30 and the like: the day must survive the round trip.
    if civil_from_days(days) != (year, month_u, day_u) {
        return None;
    }
    Some(((days * 86_400 + hour * 3600 + minute * 60 + second) * 1000) + milli)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_through_iso_text() {
        for ms in [0, 1_718_100_000_123, 951_782_400_000, 4_102_444_799_999] {
            assert_eq!(parse_iso_utc(&iso_utc(ms)), Some(ms), "{}", iso_utc(ms));
        }
        assert_eq!(iso_utc(1_718_100_000_000), "2024-06-11T10:00:00.000Z");
        assert_eq!(
            parse_iso_utc("2024-06-11T10:00:00Z"),
            Some(1_718_100_000_000)
        );
        assert_eq!(
            parse_iso_utc("2024-06-11T10:00:00.5Z"),
            Some(1_718_100_000_500)
        );
        for bad in [
            "2024-06-11",
            "2024-06-11T10:00:00+02:00",
            "2024-02-30T10:00:00Z",
            "2024-13-01T10:00:00Z",
            "2024-06-11T24:00:00Z",
            "2024-06-11T10:00:00.12345Z",
            "2024-06-11T10:0a:00Z",
            "２024-06-11T10:00:00Z",
        ] {
            assert_eq!(parse_iso_utc(bad), None, "{bad}");
        }
    }

    #[test]
    fn legacy_forms() {
        assert_eq!(legacy_time(1_718_100_000_000), "2024.06.11 10:00:00");
        assert_eq!(legacy_date("1985-12-10"), "1985.12.10");
        assert_eq!(time_text(0), "1970-01-01 00:00:00 UTC");
        for days in [-800_000, -1, 0, 59, 60, 19_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}

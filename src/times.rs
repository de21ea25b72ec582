//! Instants as text, by `jiff`: RFC 3339 in UTC for the REST API, the original Public API's
//! `yyyy.mm.dd HH:MM:SS` and spreadsheet serial days in the clinic's time zone
//! (`[Clinic] time_zone`), and dates for people. Stored instants are Unix milliseconds, UTC.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// An instant in Unix ms as a `Timestamp`, clamped to the range jiff represents (years
/// -9999 to 9999), which every stored instant is far inside.
pub fn timestamp(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(if ms < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    })
}

/// `2024-06-11T10:00:00.000Z` (RFC 3339, UTC, milliseconds).
pub fn iso_utc(ms: i64) -> String {
    timestamp(ms).strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Parses an RFC 3339 instant with an explicit offset (`2024-06-11T10:00:00Z`,
/// `2024-06-11T12:00:00.5+02:00`) to Unix ms. None when it is not one, names no offset, or
/// is more precise than a millisecond (an instant is never silently rounded).
pub fn parse_iso_utc(text: &str) -> Option<i64> {
    if !rfc_3339_shape(text) {
        return None;
    }
    let instant: Timestamp = text.parse().ok()?;
    if instant.subsec_nanosecond() % 1_000_000 != 0 {
        return None;
    }
    Some(instant.as_millisecond())
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,3}](Z|+HH:MM|-HH:MM)`, exactly: the form the OpenAPI
/// description states (jiff also reads forms such as a space for `T`, which it does not).
fn rfc_3339_shape(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|part| part.iter().all(u8::is_ascii_digit))
    };
    let head = digits(0..4)
        && bytes.get(4) == Some(&b'-')
        && digits(5..7)
        && bytes.get(7) == Some(&b'-')
        && digits(8..10)
        && bytes.get(10) == Some(&b'T')
        && digits(11..13)
        && bytes.get(13) == Some(&b':')
        && digits(14..16)
        && bytes.get(16) == Some(&b':')
        && digits(17..19);
    if !head {
        return false;
    }
    let mut at = 19;
    if bytes.get(at) == Some(&b'.') {
        let fraction = bytes[at + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if !(1..=3).contains(&fraction) {
            return false;
        }
        at += 1 + fraction;
    }
    match &bytes[at..] {
        [b'Z'] => true,
        [b'+' | b'-', ..] => {
            let rest = &text[at + 1..];
            rest.len() == 5
                && rest.as_bytes()[2] == b':'
                && rest[..2].bytes().all(|b| b.is_ascii_digit())
                && rest[3..].bytes().all(|b| b.is_ascii_digit())
        }
        _ => false,
    }
}

/// `2024-06-11 10:00:00 UTC`, for people.
pub fn time_text(ms: i64) -> String {
    timestamp(ms).strftime("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `2024-06-11`: the UTC day of an instant.
pub fn utc_day(ms: i64) -> String {
    timestamp(ms).strftime("%Y-%m-%d").to_string()
}

/// The last day an expiry instant leaves valid, for people: a licence expiring at
/// `2032-01-01 00:00 UTC` is `valid through 2031-12-31 (UTC)`.
pub fn valid_through(expires_at_ms: i64) -> String {
    format!(
        "valid through {} (UTC)",
        utc_day(expires_at_ms.saturating_sub(1))
    )
}

/// The time zone `[Clinic] time_zone` names: an IANA name (`Europe/Copenhagen`), or the
/// machine's own zone when empty. The error says what is wrong with the name.
pub fn clinic_zone(name: &str) -> Result<TimeZone, String> {
    if name.is_empty() {
        return Ok(TimeZone::system());
    }
    TimeZone::get(name).map_err(|error| {
        format!(
            "{name:?} is not a time zone of the IANA database (e.g. Europe/Copenhagen): {error}"
        )
    })
}

/// The name of a zone for people: its IANA name, or its offset when it has none.
pub fn zone_name(zone: &TimeZone) -> String {
    match zone.iana_name() {
        Some(name) => name.to_string(),
        None => format!("UTC{}", zone.to_offset(Timestamp::now())),
    }
}

/// The original API's local date and time: `2024.06.11 12:00:00` in `zone`.
pub fn legacy_time(ms: i64, zone: &TimeZone) -> String {
    zone.to_datetime(timestamp(ms))
        .strftime("%Y.%m.%d %H:%M:%S")
        .to_string()
}

/// The original API's local date: `2024.06.11` in `zone`.
pub fn legacy_day(ms: i64, zone: &TimeZone) -> String {
    zone.to_datetime(timestamp(ms))
        .strftime("%Y.%m.%d")
        .to_string()
}

/// A stored date of birth (`yyyy-mm-dd`) as the original API writes it (`yyyy.mm.dd`); None
/// when it is not known (empty) or not a date.
pub fn legacy_date(date: &str) -> Option<String> {
    let date: Date = date.parse().ok()?;
    Some(date.strftime("%Y.%m.%d").to_string())
}

/// An instant as the original wrote a moment into text: the spreadsheet serial day of its
/// local time in `zone` (days since 1899-12-30 00:00, ten decimals), e.g. `44804.4729064236`.
pub fn serial_day(ms: i64, zone: &TimeZone) -> String {
    let offset_ms = i64::from(zone.to_offset(timestamp(ms)).seconds()) * 1000;
    let units = es_storage::tables::serial_day_units(ms.saturating_add(offset_ms));
    es_storage::tables::serial_day_text(units)
}

/// (year, month, day, hour, minute, second) of an instant in UTC, for formats that carry a
/// calendar time (ZIP entries).
pub fn utc_parts(ms: i64) -> (i16, i8, i8, i8, i8, i8) {
    let time = TimeZone::UTC.to_datetime(timestamp(ms));
    (
        time.year(),
        time.month(),
        time.day(),
        time.hour(),
        time.minute(),
        time.second(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_through_rfc_3339_text() {
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
        // An explicit offset is the same instant.
        assert_eq!(
            parse_iso_utc("2024-06-11T12:00:00+02:00"),
            Some(1_718_100_000_000)
        );
        for bad in [
            "2024-06-11",
            "2024-06-11T10:00:00",
            "2024-02-30T10:00:00Z",
            "2024-13-01T10:00:00Z",
            "2024-06-11T24:00:00Z",
            "2024-06-11T10:00:00.1234Z",
            "2024-06-11T10:0a:00Z",
            "２024-06-11T10:00:00Z",
            "2024-06-11 10:00:00Z",
            "2024-06-11t10:00:00z",
            "2024-06-11T10:00:00+0200",
            "2024-06-11T10:00:00.Z",
        ] {
            assert_eq!(parse_iso_utc(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_original_apis_forms_are_local_to_the_clinic() {
        let copenhagen = clinic_zone("Europe/Copenhagen").unwrap();
        // 2022-08-31 09:20:59 UTC is 11:20:59 summer time in Copenhagen.
        let ms = 1_661_937_659_000;
        assert_eq!(legacy_time(ms, &copenhagen), "2022.08.31 11:20:59");
        assert_eq!(legacy_time(ms, &TimeZone::UTC), "2022.08.31 09:20:59");
        assert_eq!(legacy_day(ms, &copenhagen), "2022.08.31");
        // The serial day counts local time: 11:20:59 is 0.4729050926 of a day.
        assert_eq!(serial_day(ms, &copenhagen), "44804.4729050925");
        assert_eq!(serial_day(0, &TimeZone::UTC), "25569.0000000000");
        assert_eq!(legacy_date("1985-12-10").as_deref(), Some("1985.12.10"));
        assert_eq!(legacy_date(""), None);
        assert_eq!(legacy_date("1985-02-30"), None);
        assert_eq!(time_text(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(
            valid_through(1_956_528_000_000),
            "valid through 2031-12-31 (UTC)"
        );
        assert!(clinic_zone("Mars/Olympus").is_err());
        assert_eq!(utc_parts(1_718_100_000_000), (2024, 6, 11, 10, 0, 0));
    }
}

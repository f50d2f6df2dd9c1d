//! Column values as a message needs them: a bytea payload as its bytes, a payload shaped the
//! way the Debezium Event Router shapes it, and a timestamp column as milliseconds.
//!
//! Postgres sends every column as text (pgoutput's text format, and the `::text` of backfilled
//! and replayed rows). For most types that text is what consumers want, byte for byte: the
//! JSON of `json` and `jsonb`, the characters of `text`. A `bytea` column arrives as its text
//! form (`\x0a0b…`, or the older escape form), which [`bytea`] turns back into the bytes.

use bytes::Bytes;

use crate::event::{Poison, PoisonKind};

/// The type OID of `bytea`.
pub const BYTEA_OID: u32 = 17;

/// How the payload column becomes the message value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PayloadEncoding {
    /// The column's bytes as they are (the default).
    #[default]
    AsIs,
    /// A JSON string holding the payload's text, as the Event Router writes a payload it does
    /// not expand (`table.expand.json.payload = false`, its default). A bytea payload stays
    /// raw bytes, as with Debezium's `BinaryDataConverter`.
    JsonString,
    /// The payload's JSON document itself, without insignificant whitespace, as the Event
    /// Router writes it with `table.expand.json.payload = true`. A payload that is not JSON
    /// is written as a JSON string, as the Event Router keeps content it cannot parse.
    JsonDocument,
}

/// Where an event's timestamp comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TimestampSource {
    /// The transaction's commit time, without writing a Redis `time` field (the default).
    #[default]
    CommitQuiet,
    /// The transaction's commit time.
    Commit,
    /// A column: `timestamptz`, `timestamp` (taken as UTC) or milliseconds since the epoch.
    Column(String),
}

/// A `bytea` column's text form as its bytes: `\x` followed by hex digits, or the escape form
/// (`\\` for a backslash, `\ooo` in octal for any byte, other bytes as they are).
pub fn bytea(text: &[u8]) -> Result<Vec<u8>, String> {
    if let Some(hex) = text.strip_prefix(b"\\x") {
        if hex.len() % 2 != 0 {
            return Err("odd number of hex digits in bytea text".into());
        }
        return hex
            .chunks(2)
            .map(|pair| {
                let digit = |c: u8| (c as char).to_digit(16);
                match (digit(pair[0]), digit(pair[1])) {
                    (Some(h), Some(l)) => Ok((h * 16 + l) as u8),
                    _ => Err(format!(
                        "{:?} is not a hex byte in bytea text",
                        String::from_utf8_lossy(pair)
                    )),
                }
            })
            .collect();
    }
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] != b'\\' {
            out.push(text[i]);
            i += 1;
        } else if text.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let octal = text
                .get(i + 1..i + 4)
                .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
                .ok_or("a backslash not followed by three octal digits in bytea text")?;
            let value = octal.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(value).map_err(|_| "an octal escape over 377 in bytea text")?);
            i += 4;
        }
    }
    Ok(out)
}

/// `text` as a JSON string literal, escaped as Jackson (Kafka Connect's `JsonConverter`) does:
/// `"` and `\` escaped, control characters as `\n`-style escapes or `\u00XX` in upper case,
/// everything else (also non-ASCII) as it is.
pub fn json_string(text: &[u8]) -> Bytes {
    let text = String::from_utf8_lossy(text);
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    Bytes::from(out)
}

/// The JSON document `text` without the whitespace outside its strings; `None` when `text`
/// is not JSON. Numbers, strings and member order are kept byte for byte.
pub fn compact_json(text: &[u8]) -> Option<Bytes> {
    serde_json::from_slice::<serde::de::IgnoredAny>(text).ok()?;
    let mut out = Vec::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for &b in text {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
            out.push(b);
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            out.push(b);
        }
    }
    Some(Bytes::from(out))
}

/// A timestamp column's text as milliseconds since the Unix epoch: Postgres' ISO output of
/// `timestamptz` (`2026-12-06 05:00:00.123456+00`, `…+05:30`), of `timestamp` (no offset:
/// UTC), the same with a `T`, or a whole number of milliseconds.
pub fn timestamp_millis(column: &str, text: &[u8]) -> Result<i64, Poison> {
    let invalid = || {
        Poison::new(
            PoisonKind::InvalidTimestamp,
            format!(
                "timestamp column {column:?} holds {:?}, which is neither an ISO timestamp \
                 (Postgres' DateStyle ISO) nor milliseconds since the epoch",
                String::from_utf8_lossy(text)
            ),
        )
    };
    let text = std::str::from_utf8(text).map_err(|_| invalid())?;
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    parse_iso(text).ok_or_else(invalid)
}

fn parse_iso(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(range)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b' ' | b'T') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut at = 19;
    let mut millis = 0;
    if b.get(at) == Some(&b'.') {
        let digits = b[at + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 {
            return None;
        }
        let fraction = &text[at + 1..at + 1 + digits];
        let first3: String = fraction.chars().chain("000".chars()).take(3).collect();
        millis = first3.parse::<i64>().ok()?;
        at += 1 + digits;
    }
    let offset_seconds = match b.get(at) {
        None => 0,
        Some(b'Z') if at + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) => {
            let sign = if *sign == b'-' { -1 } else { 1 };
            let rest: Vec<&str> = text[at + 1..].split(':').collect();
            if rest.is_empty() || rest.len() > 3 || rest.iter().any(|p| p.len() != 2) {
                return None;
            }
            let mut seconds = 0;
            for (part, unit) in rest.iter().zip([3600, 60, 1]) {
                seconds += part.parse::<i64>().ok()? * unit;
            }
            sign * seconds
        }
        Some(_) => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    Some(seconds * 1000 + millis)
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC timestamp with milliseconds
/// (`2019-05-03T13:31:34.484Z`), as CloudEvents' `time` attribute wants it.
pub fn rfc3339_millis(ms: i64) -> String {
    let (days, in_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (year, month, day) = civil_from_days(days);
    let (seconds, millis) = (in_day / 1000, in_day % 1000);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// The proleptic Gregorian date of a day number since 1970-01-01 (Howard Hinnant's
/// algorithm, the inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytea_text_becomes_its_bytes() {
        let all: Vec<u8> = (0..=255).collect();
        let hex: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(bytea(format!("\\x{hex}").as_bytes()).unwrap(), all);
        assert_eq!(bytea(b"\\x").unwrap(), b"");
        assert_eq!(bytea(b"\\xDEADbeef").unwrap(), [0xde, 0xad, 0xbe, 0xef]);
        // The escape form (bytea_output = escape).
        assert_eq!(bytea(b"a\\\\b\\000\\377z").unwrap(), b"a\\b\x00\xffz");
        assert!(bytea(b"\\x0").is_err());
        assert!(bytea(b"\\xzz").is_err());
        assert!(bytea(b"\\9").is_err());
        assert!(bytea(b"\\400").is_err());
    }

    #[test]
    fn json_strings_are_escaped_as_jackson_does() {
        assert_eq!(
            json_string(br#"{"id": 1, "note": "a\"b"}"#),
            r#""{\"id\": 1, \"note\": \"a\\\"b\"}""#
        );
        assert_eq!(
            json_string(b"\x01\n\t\\/\xc3\xa9"),
            "\"\\u0001\\n\\t\\\\/\u{e9}\""
        );
        assert_eq!(json_string(b"\x1f"), "\"\\u001F\"");
    }

    #[test]
    fn json_is_compacted_outside_strings_only() {
        assert_eq!(
            compact_json(br#"{"a b": 1, "c": [1, 2.50, "x y"], "d": {"e": null}}"#).unwrap(),
            r#"{"a b":1,"c":[1,2.50,"x y"],"d":{"e":null}}"#
        );
        assert_eq!(
            compact_json(br#"{"q": "a\" b", "n": 1}"#).unwrap(),
            r#"{"q":"a\" b","n":1}"#
        );
        assert_eq!(compact_json(b"not json"), None);
        assert_eq!(compact_json(b"{\"a\": 1"), None);
    }

    #[test]
    fn milliseconds_print_as_rfc3339_and_read_back() {
        assert_eq!(
            rfc3339_millis(1_556_890_294_484),
            "2019-05-03T13:31:34.484Z"
        );
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        for ms in [
            0,
            1,
            951_782_400_123,
            1_556_890_294_484,
            4_102_444_800_000,
            -86_400_001,
        ] {
            let text = rfc3339_millis(ms);
            assert_eq!(
                timestamp_millis("t", text.as_bytes()).unwrap(),
                ms,
                "{text}"
            );
        }
    }

    #[test]
    fn timestamps_are_read_in_postgres_iso_forms() {
        let ms = |s: &str| timestamp_millis("ts", s.as_bytes());
        // 2019-05-03 13:31:34.484 UTC, the Event Router documentation's example timestamp.
        assert_eq!(ms("2019-05-03 13:31:34.484+00").unwrap(), 1_556_890_294_484);
        assert_eq!(
            ms("2019-05-03 13:31:34.484123+00").unwrap(),
            1_556_890_294_484
        );
        assert_eq!(ms("2019-05-03T13:31:34.484Z").unwrap(), 1_556_890_294_484);
        assert_eq!(ms("2019-05-03 15:31:34.484+02").unwrap(), 1_556_890_294_484);
        assert_eq!(
            ms("2019-05-03 08:01:34.484-05:30").unwrap(),
            1_556_890_294_484
        );
        assert_eq!(ms("2019-05-03 13:31:34.4").unwrap(), 1_556_890_294_400);
        assert_eq!(ms("1970-01-01 00:00:00").unwrap(), 0);
        assert_eq!(ms("1969-12-31 23:59:59+00").unwrap(), -1000);
        assert_eq!(ms("2000-02-29 00:00:00+00").unwrap(), 951_782_400_000);
        assert_eq!(ms("1556890294484").unwrap(), 1_556_890_294_484);
        for bad in [
            "infinity",
            "05/03/2019 13:31:34",
            "2019-13-03 00:00:00",
            "2019-05-03 13:31:34+0",
            "2019-05-03 13:31:34.",
            "",
        ] {
            let poison = ms(bad).unwrap_err();
            assert_eq!(poison.kind, PoisonKind::InvalidTimestamp, "{bad}");
            assert!(poison.detail.contains("\"ts\""), "{poison}");
        }
    }
}

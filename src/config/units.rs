//! Durations ("30s", "10m", "1500ms") and byte sizes ("256MiB", 1024) in config values and flags.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration ({e}); try 30s, 500ms or 10m"))
}

pub fn parse_byte_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits.parse().map_err(|_| format!("{s:?} is not a size; try 1048576 or 64MiB"))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "kB" | "KB" => 1 << 10,
        "MiB" | "MB" => 1 << 20,
        "GiB" | "GB" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}; use B, KiB, MiB or GiB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

pub(crate) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// A duration, or "auto" for None.
pub(crate) fn de_auto_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_auto_duration(&s).map_err(serde::de::Error::custom)
}

pub fn parse_auto_duration(s: &str) -> Result<Option<Duration>, String> {
    if s.trim() == "auto" {
        return Ok(None);
    }
    parse_duration(s).map(Some)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Int(u64),
    Text(String),
}

pub(crate) fn de_byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match SizeValue::deserialize(d)? {
        SizeValue::Int(n) => usize::try_from(n).map_err(serde::de::Error::custom),
        SizeValue::Text(s) => parse_byte_size(&s).map_err(serde::de::Error::custom),
    }
}

/// File permissions as an octal string ("0770", "770"). Not a TOML integer: 0o770 and 504 read
/// alike, and 770 would silently mean something else.
pub(crate) fn de_file_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let mode = match SizeValue::deserialize(d)? {
        SizeValue::Int(_) => return Err(serde::de::Error::custom("give the mode as an octal string, like \"0770\"")),
        SizeValue::Text(s) => parse_file_mode(&s).map_err(serde::de::Error::custom)?,
    };
    if mode > 0o777 {
        return Err(serde::de::Error::custom(format!("{mode:o} is not a file mode (at most 0777)")));
    }
    Ok(mode)
}

pub fn parse_file_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim(), 8).map_err(|_| format!("{s:?} is not an octal file mode like \"0770\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_modes_are_octal_strings_only() {
        #[derive(Deserialize)]
        struct M {
            #[serde(deserialize_with = "de_file_mode")]
            m: u32,
        }
        let mode = |t: &str| toml::from_str::<M>(t).map(|m| m.m).map_err(|e| e.to_string());
        assert_eq!(mode(r#"m = "0770""#), Ok(0o770));
        assert_eq!(mode(r#"m = "660""#), Ok(0o660));
        assert!(mode("m = 0o700").unwrap_err().contains("octal string"), "an integer is ambiguous");
        assert!(mode(r#"m = "0778""#).is_err());
        assert!(mode(r#"m = "01777""#).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_byte_size("1024").unwrap(), 1024);
        assert_eq!(parse_byte_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_byte_size("1 GiB").unwrap(), 1 << 30);
        assert!(parse_byte_size("lots").is_err());
        assert!(parse_byte_size("5PiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert!(parse_duration("30").is_err());
    }
}

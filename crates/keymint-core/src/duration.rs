//! Human durations for configuration files and the CLI: `90s`, `15m`,
//! `1h30m`, `7d`. The API itself takes whole seconds.

/// Parses a duration into whole seconds.
pub fn parse_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => {
                return Err(format!(
                    "invalid duration `{s}` (use e.g. 90s, 15m, 1h30m, 7d)"
                ));
            }
        };
        if num.is_empty() {
            return Err(format!(
                "invalid duration `{s}` (a unit needs a number before it)"
            ));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration `{s}` is too large"))?;
        num.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("duration `{s}` is too large"))?;
        let _ = chars.peek();
    }
    if !num.is_empty() {
        return Err(format!(
            "invalid duration `{s}` (missing unit after `{num}`)"
        ));
    }
    Ok(total)
}

/// Formats seconds compactly (`1h30m`, `45s`, `0s`).
pub fn format_secs(mut secs: u64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= len {
            out.push_str(&format!("{}{unit}", secs / len));
            secs %= len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        assert_eq!(parse_secs("90"), Ok(90));
        assert_eq!(parse_secs("15m"), Ok(900));
        assert_eq!(parse_secs("1h30m"), Ok(5400));
        assert_eq!(parse_secs("7d"), Ok(604_800));
        assert_eq!(format_secs(5400), "1h30m");
        assert_eq!(format_secs(0), "0s");
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        assert!(parse_secs("").is_err());
        assert!(parse_secs("-5m").unwrap_err().contains("invalid duration"));
        assert!(parse_secs("5x").is_err());
        assert!(parse_secs("m").is_err());
        assert!(parse_secs("10").is_ok());
        assert!(parse_secs("1h5").unwrap_err().contains("missing unit"));
        assert!(
            parse_secs("99999999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
    }
}

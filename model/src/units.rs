//! Durations as people type them on a command line: `500ms`, `5s`, `2m`,
//! `1h30m`, `90d`, or plain seconds. Parsing is humantime's (checked: an
//! overflow is an error, never a panic); every caller gives the range its
//! flag accepts, and a value outside it is refused with that range.

use std::time::Duration;

/// Why a duration was refused.
#[derive(Debug, thiserror::Error)]
pub enum DurationError {
    #[error("{input:?} is not a duration ({source}): use e.g. 500ms, 5s, 2m, 1h30m or 90d")]
    Syntax {
        input: String,
        source: humantime::DurationError,
    },
    #[error("{input:?} is out of range: {what} must be between {min} and {max}")]
    OutOfRange {
        input: String,
        what: &'static str,
        min: Short,
        max: Short,
    },
}

/// What a flag accepts: a name for messages, and its bounds (inclusive).
#[derive(Debug, Clone, Copy)]
pub struct Range {
    pub what: &'static str,
    pub min: Duration,
    pub max: Duration,
}

/// The longest duration a service spec holds (restart delay and window,
/// update delay and monitor): a year, far past any real use, and small
/// enough that adding it to a timestamp in ms can't overflow.
pub const SPEC_MAX: Duration = Duration::from_secs(365 * 86_400);

/// A bound as a flag would take it: `365d`, `12h`, `6s`, `500ms`.
#[derive(Debug, Clone, Copy)]
pub struct Short(pub Duration);

impl std::fmt::Display for Short {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms > 0 && ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Range {
    /// Parses `s` and checks it against the range.
    pub fn parse(&self, s: &str) -> Result<Duration, DurationError> {
        let t = s.trim();
        let parsed = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            // Plain seconds: humantime wants a unit.
            t.parse::<u64>()
                .map(Duration::from_secs)
                .map_err(|_| humantime::DurationError::NumberOverflow)
        } else {
            humantime::parse_duration(t)
        };
        let d = match parsed {
            Ok(d) => Some(d),
            // Too big to represent is simply too big.
            Err(humantime::DurationError::NumberOverflow) => None,
            Err(source) => {
                return Err(DurationError::Syntax {
                    input: s.to_owned(),
                    source,
                });
            }
        };
        let Some(d) = d.filter(|d| (self.min..=self.max).contains(d)) else {
            return Err(DurationError::OutOfRange {
                input: s.to_owned(),
                what: self.what,
                min: Short(self.min),
                max: Short(self.max),
            });
        };
        Ok(d)
    }

    /// A clap value parser for this range.
    pub fn parser(
        self,
    ) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
        move |s| self.parse(s).map_err(|e| e.to_string())
    }

    /// As [`Range::parse`], in whole milliseconds (what specs store).
    pub fn parse_ms(&self, s: &str) -> Result<u64, DurationError> {
        // At most `max`, which callers keep far below u64::MAX ms.
        self.parse(s)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const R: Range = Range {
        what: "the delay",
        min: Duration::ZERO,
        max: SPEC_MAX,
    };

    #[test]
    fn units_and_ranges() {
        assert_eq!(R.parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(R.parse("5").unwrap(), Duration::from_secs(5));
        assert_eq!(R.parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(R.parse("90d").unwrap(), Duration::from_secs(90 * 86_400));
        for (input, want) in [
            (
                "99999999999999999h",
                "out of range: the delay must be between 0ms and 365d",
            ),
            ("999999999999999999999999", "out of range"),
            ("9999999d", "out of range"),
            ("5x", "is not a duration"),
            ("", "is not a duration"),
            ("-1s", "is not a duration"),
        ] {
            let err = R.parse(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }

    proptest! {
        /// Any string: a duration in range, or an error; never a panic.
        #[test]
        fn any_input_parses_or_is_refused(s in "\\PC{0,40}") {
            if let Ok(d) = R.parse(&s) {
                prop_assert!(d <= SPEC_MAX);
            }
        }

        /// Digits and units in any mix, including huge numbers.
        #[test]
        fn unit_soup_never_overflows(n in any::<u64>(), m in any::<u64>(),
                                     u in "(ns|us|ms|s|m|h|d|w|y)", v in "(ms|s|m|h|d)") {
            let s = format!("{n}{u}{m}{v}");
            if let Ok(d) = R.parse(&s) {
                prop_assert!(d <= SPEC_MAX);
                prop_assert!(R.parse_ms(&s).unwrap() <= SPEC_MAX.as_millis() as u64);
            }
        }
    }
}

//! Log sequence numbers: positions in Postgres' write-ahead log.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A position in the write-ahead log, displayed the way Postgres does (`16/B374D848`).
///
/// Ordering is the WAL order. Positions only ever move forward through [`Checkpoint`]
/// (see [`crate::checkpoint`]); this type itself is a plain value.
///
/// [`Checkpoint`]: crate::Checkpoint
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(u64);

impl Lsn {
    /// The invalid position `0/0`; Postgres uses it for "none".
    pub const ZERO: Lsn = Lsn(0);

    /// Wraps a raw 64-bit position.
    pub const fn new(raw: u64) -> Self {
        Lsn(raw)
    }

    /// The raw 64-bit position.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Bytes of WAL from `self` up to `later`; zero when `later` is not ahead.
    pub const fn bytes_until(self, later: Lsn) -> u64 {
        later.0.saturating_sub(self.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The newest WAL position the server is known to have reached, shared between the task that
/// learns it (keepalives, the retention watcher) and those that need a bound on what can have
/// been written (the effectively-once Redis sink). It only moves forward. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct WalHorizon(Arc<AtomicU64>);

impl WalHorizon {
    /// The server reached `lsn`.
    pub fn observe(&self, lsn: Lsn) {
        self.0.fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// The newest position observed, or `None` before the first.
    pub fn get(&self) -> Option<Lsn> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            raw => Some(Lsn(raw)),
        }
    }
}

/// A string that is not of the form `HI/LO` with hexadecimal halves of at most 32 bits each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {input:?}: expected two hexadecimal halves like 16/B374D848")]
pub struct ParseLsnError {
    input: String,
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError {
            input: s.to_owned(),
        };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_like_postgres_and_parses_back() {
        let lsn = Lsn::new(0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(lsn));
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn::ZERO));
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in ["", "16", "16/", "/1", "G/1", "1/100000000", "1/2/3"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn the_horizon_only_moves_forward_and_is_shared() {
        let h = WalHorizon::default();
        assert_eq!(h.get(), None);
        let other = h.clone();
        other.observe(Lsn::new(50));
        h.observe(Lsn::new(40));
        assert_eq!(h.get(), Some(Lsn::new(50)));
    }

    #[test]
    fn distance_saturates() {
        assert_eq!(Lsn::new(10).bytes_until(Lsn::new(25)), 15);
        assert_eq!(Lsn::new(25).bytes_until(Lsn::new(10)), 0);
    }
}

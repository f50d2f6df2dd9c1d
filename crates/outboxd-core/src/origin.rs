//! Which WAL history a position belongs to, and how far a record made in another one can be
//! trusted.
//!
//! A [`Position`] is a place in one database's WAL. The same numbers come back under other
//! histories: a new cluster starts again near `0/0`; a point-in-time restore, or a standby
//! promoted after an asynchronous failover, starts a new timeline that branches off the old
//! one and then writes its own events at positions the old one had already used. So an
//! effectively-once marker ("everything up to this position is at the broker") is kept under
//! its [`WalOrigin::key`] (the system identifier, the database, the slot) and carries the
//! timeline it was written on; before a sink skips anything as already delivered, it asks
//! [`WalOrigin::trust`] how much of the marker is this server's history:
//!
//! ```text
//! marker (timeline t, position p)       server (timeline T, WAL end E, ancestors)
//!   t == T, p <= E                  ->  Whole: skip what is at or below p
//!   t == T, p >  E                  ->  Foreign: a restored or another server
//!   t <  T, t ended at S (ancestor) ->  Below(S): skip only what committed before S
//!   t <  T, t no ancestor           ->  Foreign
//!   t >  T                          ->  Foreign
//! ```
//!
//! Everything before the point `S` where timeline `t` ended is shared by both histories
//! (each timeline begins with a copy of its parent up to there); a commit record that starts
//! before `S` ends by `S`, so `commit_lsn < S` is the test.

use std::fmt;

use crate::event::Position;
use crate::lsn::Lsn;

/// The WAL history a replication session streams: read from the server
/// (`IDENTIFY_SYSTEM`, `TIMELINE_HISTORY`) on the session's own connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalOrigin {
    /// The cluster's system identifier (decimal): the same on its standbys and restores,
    /// different for a new cluster.
    pub system_id: String,
    /// The database.
    pub database: String,
    /// The replication slot.
    pub slot: String,
    /// The server's timeline.
    pub timeline: u32,
    /// The server's WAL flush position when the session began.
    pub wal_end: Lsn,
    /// The timelines this one descends from, each with the position where it ended (the
    /// timeline history file); empty on timeline 1.
    pub ancestors: Vec<(u32, Lsn)>,
}

/// An effectively-once record: everything up to `position`, written on `timeline`, is at
/// the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// The last event at the broker.
    pub position: Position,
    /// The timeline it was written on.
    pub timeline: u32,
}

/// How much of a [`Marker`] belongs to this server's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// All of it.
    Whole,
    /// Only what committed before this position, where the marker's timeline ended.
    Below(Lsn),
    /// None: another history, and why.
    Foreign(String),
}

impl Marker {
    /// The marker as the brokers keep it:
    /// `{"timeline":1,"commit_lsn":"16/B374D848","index":12}`.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"timeline\":{},\"commit_lsn\":\"{}\",\"index\":{}}}",
            self.timeline, self.position.commit_lsn, self.position.index
        )
    }

    /// A marker written by [`to_json`](Self::to_json); `None` for anything else (including
    /// markers of versions that did not record the timeline: those are not trusted).
    pub fn from_json(value: &[u8]) -> Option<Marker> {
        let v: serde_json::Value = serde_json::from_slice(value).ok()?;
        let timeline = u32::try_from(v.get("timeline")?.as_u64()?).ok()?;
        let commit_lsn: Lsn = v.get("commit_lsn")?.as_str()?.parse().ok()?;
        let index = u32::try_from(v.get("index")?.as_u64()?).ok()?;
        Some(Marker {
            position: Position { commit_lsn, index },
            timeline,
        })
    }

    /// The one of `self` and `other` (of one timeline) that is further along.
    pub fn max_by_position(self, other: Marker) -> Marker {
        if other.position > self.position {
            other
        } else {
            self
        }
    }

    /// Whether the event at `position` is at the broker according to this marker, as far as
    /// `trust` allows.
    pub fn covers(&self, trust: &Trust, position: Position) -> bool {
        position <= self.position
            && match trust {
                Trust::Whole => true,
                Trust::Below(end) => position.commit_lsn < *end,
                Trust::Foreign(_) => false,
            }
    }
}

impl WalOrigin {
    /// The key effectively-once markers of this slot are kept under:
    /// `<system id>/<database>/<slot>`.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.system_id, self.database, self.slot)
    }

    /// How much of `marker`, kept under this origin's [`key`](Self::key), is this server's
    /// history (see the module documentation).
    pub fn trust(&self, marker: &Marker) -> Trust {
        let at = marker.position.commit_lsn;
        if marker.timeline == self.timeline {
            if at > self.wal_end {
                return Trust::Foreign(format!(
                    "it is at {at}, beyond the server's WAL end {} on the same timeline {}: this \
                     server is a restored copy or another cluster with the same system identifier",
                    self.wal_end, self.timeline
                ));
            }
            return Trust::Whole;
        }
        if marker.timeline > self.timeline {
            return Trust::Foreign(format!(
                "it was written on timeline {}, and the server is on timeline {}: another \
                 history (a restore from before that timeline)",
                marker.timeline, self.timeline
            ));
        }
        match self
            .ancestors
            .iter()
            .find(|(timeline, _)| *timeline == marker.timeline)
        {
            Some((_, end)) if at < *end => Trust::Whole,
            Some((_, end)) => Trust::Below(*end),
            None => Trust::Foreign(format!(
                "it was written on timeline {}, which is not an ancestor of the server's timeline \
                 {}",
                marker.timeline, self.timeline
            )),
        }
    }
}

impl fmt::Display for WalOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "system {} database {:?} slot {:?} timeline {}",
            self.system_id, self.database, self.slot, self.timeline
        )
    }
}

/// The ancestors in a timeline history file (`TIMELINE_HISTORY`): lines `parent<TAB>switch
/// point<TAB>reason`; comments and blank lines skipped; `None` when a line is not one.
pub fn parse_timeline_history(text: &str) -> Option<Vec<(u32, Lsn)>> {
    let mut ancestors = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let timeline = fields.next()?.parse().ok()?;
        let end = fields.next()?.parse().ok()?;
        ancestors.push((timeline, end));
    }
    Some(ancestors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(timeline: u32, wal_end: u64, ancestors: &[(u32, u64)]) -> WalOrigin {
        WalOrigin {
            system_id: "7716664758492421858".into(),
            database: "app".into(),
            slot: "outboxd".into(),
            timeline,
            wal_end: Lsn::new(wal_end),
            ancestors: ancestors.iter().map(|(t, l)| (*t, Lsn::new(*l))).collect(),
        }
    }

    fn marker(timeline: u32, lsn: u64, index: u32) -> Marker {
        Marker {
            position: Position {
                commit_lsn: Lsn::new(lsn),
                index,
            },
            timeline,
        }
    }

    fn at(lsn: u64, index: u32) -> Position {
        Position {
            commit_lsn: Lsn::new(lsn),
            index,
        }
    }

    #[test]
    fn a_marker_of_the_same_timeline_within_the_wal_is_trusted_whole() {
        let o = origin(1, 0x9000, &[]);
        let m = marker(1, 0x5000, 3);
        assert_eq!(o.trust(&m), Trust::Whole);
        assert!(m.covers(&Trust::Whole, at(0x5000, 3)));
        assert!(m.covers(&Trust::Whole, at(0x4000, 9)));
        assert!(!m.covers(&Trust::Whole, at(0x5000, 4)));
        assert!(!m.covers(&Trust::Whole, at(0x6000, 0)));
        assert_eq!(o.key(), "7716664758492421858/app/outboxd");
    }

    #[test]
    fn a_marker_beyond_the_wal_or_of_a_later_timeline_is_another_history() {
        // A restored copy whose WAL is behind the marker: nothing is skipped.
        let o = origin(1, 0x4000, &[]);
        let m = marker(1, 0x5000, 0);
        let trust = o.trust(&m);
        assert!(
            matches!(&trust, Trust::Foreign(why) if why.contains("beyond")),
            "{trust:?}"
        );
        assert!(!m.covers(&trust, at(0x100, 0)));
        let o = origin(2, 0x9000, &[(1, 0x3000)]);
        assert!(matches!(o.trust(&marker(3, 0x100, 0)), Trust::Foreign(_)));
    }

    #[test]
    fn after_a_promotion_only_the_shared_part_is_trusted() {
        // Timeline 1 ended at 0x4000; the new primary writes its own events from there.
        let o = origin(2, 0x9000, &[(1, 0x4000)]);
        let m = marker(1, 0x5000, 2);
        let trust = o.trust(&m);
        assert_eq!(trust, Trust::Below(Lsn::new(0x4000)));
        assert!(m.covers(&trust, at(0x3FFF, 7)), "shared history");
        assert!(!m.covers(&trust, at(0x4000, 0)), "the new timeline's own");
        assert!(!m.covers(&trust, at(0x4800, 0)), "the new timeline's own");
        // A marker from before the branch is trusted whole.
        assert_eq!(o.trust(&marker(1, 0x3000, 0)), Trust::Whole);
        // Two promotions: timeline 1 ended at 0x4000, timeline 2 at 0x6000.
        let o = origin(3, 0x9000, &[(1, 0x4000), (2, 0x6000)]);
        assert_eq!(
            o.trust(&marker(2, 0x7000, 0)),
            Trust::Below(Lsn::new(0x6000))
        );
        assert_eq!(
            o.trust(&marker(1, 0x5000, 0)),
            Trust::Below(Lsn::new(0x4000))
        );
        // A sibling timeline is not an ancestor.
        let o = origin(3, 0x9000, &[(1, 0x4000)]);
        assert!(matches!(o.trust(&marker(2, 0x4500, 0)), Trust::Foreign(_)));
    }

    #[test]
    fn markers_round_trip_and_others_are_not_markers() {
        let m = marker(2, 0x16_B374_D848, 12);
        assert_eq!(
            m.to_json(),
            r#"{"timeline":2,"commit_lsn":"16/B374D848","index":12}"#
        );
        assert_eq!(Marker::from_json(m.to_json().as_bytes()), Some(m));
        for other in [
            &b"{}"[..],
            b"not json",
            br#"{"commit_lsn":"16/B374D848","index":12}"#,
            br#"{"timeline":1,"commit_lsn":"x","index":1}"#,
        ] {
            assert_eq!(Marker::from_json(other), None);
        }
    }

    #[test]
    fn timeline_history_files_are_read() {
        let text =
            "1\t0/3000060\tno recovery target specified\n\n2\t0/5000100\tbefore 2026-12-07\n";
        assert_eq!(
            parse_timeline_history(text),
            Some(vec![(1, Lsn::new(0x300_0060)), (2, Lsn::new(0x500_0100))])
        );
        assert_eq!(parse_timeline_history(""), Some(vec![]));
        assert_eq!(parse_timeline_history("x\ty\n"), None);
    }
}

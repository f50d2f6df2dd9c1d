//! Which WAL position is safe to confirm to the slot.
//!
//! Records are numbered in the order they are handed to the sink (0, 1, 2, ...). The sink
//! acknowledges them in that order, so "acknowledged" is one number: how many records, from
//! the first, the broker has accepted. A *mark* ties a WAL position to the number of records
//! read before it:
//!
//! - at each commit, the commit's end LSN, after the transaction's records;
//! - outside a transaction, a keepalive's WAL end: the server has nothing more to send before
//!   it, so it is safe once every record before it is acknowledged.
//!
//! The confirmed position is the LSN of the newest mark whose records are all acknowledged.
//! It only moves forward: a mark at or behind the last one is ignored, and confirming never
//! goes back.
//!
//! ```text
//! records:  0 1 2 | 3 | (none) | 4 5 6 7 ...
//! marks:        C1   C2   KA     C3
//! acked = 4  ──▶ confirm KA's wal_end; C3 waits for record 7
//! ```

use std::collections::VecDeque;

use crate::lsn::Lsn;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mark {
    /// Records handed out before this position (all of them must be acknowledged).
    records: u64,
    /// The WAL position that becomes safe.
    lsn: Lsn,
}

/// Tracks records in flight and the position that is safe to confirm.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Records handed out so far; the next record gets this number.
    issued: u64,
    /// Records acknowledged so far (always the first `acked` ones).
    acked: u64,
    /// Positions waiting for their records, oldest first, LSNs strictly increasing.
    marks: VecDeque<Mark>,
    /// The newest position whose records are all acknowledged.
    confirmed: Lsn,
}

impl Checkpoint {
    /// Starts from the position the slot has already confirmed.
    pub fn new(confirmed: Lsn) -> Self {
        Checkpoint {
            issued: 0,
            acked: 0,
            marks: VecDeque::new(),
            confirmed,
        }
    }

    /// Numbers the next record handed to the sink.
    pub fn issue(&mut self) -> u64 {
        let n = self.issued;
        self.issued += 1;
        n
    }

    /// Records `lsn` as safe once every record issued so far is acknowledged: a commit's end
    /// LSN, or a keepalive's WAL end outside any transaction.
    ///
    /// Returns the new confirmed position when it moved at once (nothing was in flight).
    pub fn mark(&mut self, lsn: Lsn) -> Option<Lsn> {
        let newest = self.marks.back().map_or(self.confirmed, |m| m.lsn);
        if lsn <= newest {
            return None;
        }
        match self.marks.back_mut() {
            // No record since the previous mark: this position supersedes it.
            Some(last) if last.records == self.issued => last.lsn = lsn,
            _ => self.marks.push_back(Mark {
                records: self.issued,
                lsn,
            }),
        }
        self.advance()
    }

    /// The broker acknowledged every record numbered below `through`.
    ///
    /// Returns the new confirmed position when it moved.
    pub fn ack(&mut self, through: u64) -> Option<Lsn> {
        debug_assert!(through <= self.issued, "acked records never issued");
        self.acked = self.acked.max(through.min(self.issued));
        self.advance()
    }

    fn advance(&mut self) -> Option<Lsn> {
        let mut moved = None;
        while let Some(mark) = self.marks.front() {
            if mark.records > self.acked {
                break;
            }
            self.confirmed = mark.lsn;
            moved = Some(mark.lsn);
            self.marks.pop_front();
        }
        moved
    }

    /// The newest position that is safe to confirm.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Records handed to the sink and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.issued - self.acked
    }

    /// Whether everything read so far is confirmed: nothing in flight and no mark waiting.
    pub fn is_settled(&self) -> bool {
        self.in_flight() == 0 && self.marks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(n: u64) -> Lsn {
        Lsn::new(n)
    }

    #[test]
    fn confirms_a_commit_only_after_all_its_records() {
        let mut c = Checkpoint::new(lsn(10));
        for _ in 0..3 {
            c.issue();
        }
        assert_eq!(c.mark(lsn(20)), None);
        assert_eq!(c.ack(2), None);
        assert_eq!(c.confirmed(), lsn(10));
        assert_eq!(c.ack(3), Some(lsn(20)));
        assert!(c.is_settled());
    }

    #[test]
    fn confirms_in_order_never_skipping_an_unacked_commit() {
        let mut c = Checkpoint::new(Lsn::ZERO);
        c.issue();
        c.mark(lsn(100)); // commit A: record 0
        c.issue();
        c.issue();
        c.mark(lsn(200)); // commit B: records 1, 2
        c.issue();
        c.mark(lsn(300)); // commit C: record 3
        assert_eq!(c.ack(1), Some(lsn(100)));
        assert_eq!(c.ack(2), None, "B still has record 2 in flight");
        assert_eq!(c.ack(4), Some(lsn(300)));
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn empty_commits_and_keepalives_confirm_at_once_when_idle() {
        let mut c = Checkpoint::new(lsn(5));
        assert_eq!(c.mark(lsn(50)), Some(lsn(50)));
        assert_eq!(c.mark(lsn(60)), Some(lsn(60)));
        assert_eq!(c.mark(lsn(55)), None, "never goes back");
        assert_eq!(c.confirmed(), lsn(60));
    }

    #[test]
    fn keepalives_behind_in_flight_records_wait_and_coalesce() {
        let mut c = Checkpoint::new(Lsn::ZERO);
        c.issue();
        c.mark(lsn(100));
        for wal_end in [150, 160, 170] {
            assert_eq!(c.mark(lsn(wal_end)), None);
        }
        assert_eq!(
            c.marks.len(),
            1,
            "positions without records in between coalesce"
        );
        assert_eq!(c.ack(1), Some(lsn(170)));
    }

    #[test]
    fn acks_never_move_backwards() {
        let mut c = Checkpoint::new(Lsn::ZERO);
        c.issue();
        c.issue();
        c.mark(lsn(10));
        assert_eq!(c.ack(2), Some(lsn(10)));
        assert_eq!(c.ack(1), None);
        assert_eq!(c.in_flight(), 0);
    }
}

//! A worker's ledger: the chunks it holds, in the order it runs them, with
//! how many results came back and the worker-life sequence number of each
//! item; and the one decision taken when a worker dies, [`settle`]: which
//! item it was running (that one fails) and what must run again.

use std::collections::VecDeque;

use super::jobs::Chunk;

/// A chunk on a worker.
#[derive(Debug, Clone)]
pub(crate) struct InFlight {
    pub(crate) chunk: Chunk,
    /// The worker-life sequence number of item `chunk.start`.
    pub(crate) seq_base: u64,
    /// Items whose results arrived, from `chunk.start`.
    pub(crate) reported: u32,
}

/// The chunks a worker holds, and its item counts.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    inflight: VecDeque<InFlight>,
    /// The sequence number the next item sent will have (the worker counts
    /// the items it starts in the same sequence).
    seq_next: u64,
    /// Items sent in the worker's life (for `max_tasks_per_child`).
    assigned: u64,
}

/// Results of `count` items of a job, starting at job index `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reported {
    pub(crate) job: u64,
    pub(crate) index: u64,
    /// The chunk is complete with these results.
    pub(crate) completes: bool,
}

impl Ledger {
    pub(crate) fn push(&mut self, chunk: Chunk) {
        let n = u64::from(chunk.len());
        self.inflight.push_back(InFlight {
            chunk,
            seq_base: self.seq_next,
            reported: 0,
        });
        self.seq_next += n;
        self.assigned += n;
    }

    pub(crate) fn len(&self) -> usize {
        self.inflight.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    pub(crate) fn assigned(&self) -> u64 {
        self.assigned
    }

    /// Records results for items `start..start + count` of chunk `chunk`.
    /// They must continue the oldest chunk's results exactly; anything else
    /// is a protocol error (`Err` names it). A completed chunk leaves the
    /// ledger.
    pub(crate) fn report(
        &mut self,
        chunk: u64,
        start: u32,
        count: u32,
    ) -> Result<Reported, &'static str> {
        let Some(front) = self.inflight.front_mut() else {
            return Err("results for no chunk");
        };
        let c = &front.chunk;
        if c.id != chunk
            || start != c.start + front.reported
            || u64::from(start) + u64::from(count) > u64::from(c.end)
        {
            return Err("results out of order");
        }
        let reported = Reported {
            job: c.job,
            index: c.base + u64::from(start),
            completes: start + count == c.end,
        };
        front.reported += count;
        if reported.completes {
            self.inflight.pop_front();
        }
        Ok(reported)
    }

    /// Every chunk held, for [`settle`]; the ledger is empty after.
    pub(crate) fn drain(&mut self) -> Vec<InFlight> {
        self.inflight.drain(..).collect()
    }
}

/// What a dead worker's chunks come to.
#[derive(Debug, Default)]
pub(crate) struct Settlement {
    /// `(job, job index, worker sequence number)` of the item to fail.
    pub(crate) failed: Vec<(u64, u64, u64)>,
    /// The pieces to run again, in order.
    pub(crate) again: Vec<Chunk>,
}

/// Decides "who died holding what": `running` is the sequence number of the
/// item the worker was running when it died (`started - 1` of its progress
/// counters when `started > finished`), if any. That item fails; every other
/// item without a reported result runs again. With no running item and
/// `blame_first` (the worker was killed for a protocol error between
/// items), the first unreported item fails instead.
pub(crate) fn settle(held: Vec<InFlight>, running: Option<u64>, blame_first: bool) -> Settlement {
    let mut out = Settlement::default();
    let mut blame_first = running.is_none() && blame_first;
    for inf in held {
        let c = inf.chunk;
        let first = c.start + inf.reported;
        if first == c.end {
            continue;
        }
        let seq_of = |i: u32| inf.seq_base + u64::from(i - c.start);
        let culprit = match running {
            Some(r) if r >= seq_of(first) && r < seq_of(c.end) => {
                Some(c.start + (r - inf.seq_base) as u32)
            }
            None if blame_first => {
                blame_first = false;
                Some(first)
            }
            _ => None,
        };
        let mut push = |start: u32, end: u32| {
            if start < end {
                let mut piece = c.clone();
                piece.start = start;
                piece.end = end;
                out.again.push(piece);
            }
        };
        match culprit {
            Some(i) => {
                push(first, i);
                out.failed.push((c.job, c.base + u64::from(i), seq_of(i)));
                push(i + 1, c.end);
            }
            None => push(first, c.end),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn chunk(id: u64, job: u64, base: u64, start: u32, end: u32) -> Chunk {
        Chunk {
            id,
            job,
            base,
            items: Arc::new(Vec::new().into()),
            start,
            end,
            kind: 0,
        }
    }

    /// A ledger holding `chunks` (`(job, base, start, end)`), with
    /// `reported` results of the first.
    fn ledger(chunks: &[(u64, u64, u32, u32)], reported: u32) -> Ledger {
        let mut l = Ledger::default();
        for (k, &(job, base, start, end)) in chunks.iter().enumerate() {
            l.push(chunk(k as u64, job, base, start, end));
        }
        if reported > 0 {
            let (_, _, start, _) = chunks[0];
            l.report(0, start, reported).unwrap();
        }
        l
    }

    fn ranges(s: &Settlement) -> Vec<(u64, u32, u32)> {
        s.again.iter().map(|c| (c.job, c.start, c.end)).collect()
    }

    #[test]
    fn settle_by_table() {
        // (chunks held, results of the first, running seq, blame_first)
        //   -> (failed (job, index, seq), pieces again (job, start, end))
        type Case = (
            &'static [(u64, u64, u32, u32)],
            u32,
            Option<u64>,
            bool,
            &'static [(u64, u64, u64)],
            &'static [(u64, u32, u32)],
        );
        let cases: &[Case] = &[
            // Died running item 5 of 0..10 after 3 results: 3..5 and 6..10 again.
            (
                &[(1, 100, 0, 10)],
                3,
                Some(5),
                false,
                &[(1, 105, 5)],
                &[(1, 3, 5), (1, 6, 10)],
            ),
            // Died between items (nothing running): all unreported again.
            (&[(1, 0, 0, 10)], 3, None, false, &[], &[(1, 3, 10)]),
            // Killed for a protocol error between items: the first unreported fails.
            (&[(1, 0, 0, 10)], 3, None, true, &[(1, 3, 3)], &[(1, 4, 10)]),
            // Running item in the second chunk (seq 10 + 2): the first runs again whole.
            (
                &[(1, 0, 0, 10), (2, 50, 4, 8)],
                0,
                Some(12),
                false,
                &[(2, 56, 12)],
                &[(1, 0, 10), (2, 4, 6), (2, 7, 8)],
            ),
            // The running item is the last of its chunk, the first of a re-sent piece.
            (&[(3, 0, 7, 8)], 0, Some(0), false, &[(3, 7, 0)], &[]),
            // Every result of the first chunk came: it is not held any more.
            (
                &[(1, 0, 0, 4), (1, 4, 0, 2)],
                4,
                Some(5),
                false,
                &[(1, 5, 5)],
                &[(1, 0, 1)],
            ),
            // A running item outside every held chunk (a stale counter): nobody fails.
            (&[(1, 0, 0, 4)], 0, Some(99), false, &[], &[(1, 0, 4)]),
        ];
        for (k, (held, reported, running, blame, failed, again)) in cases.iter().enumerate() {
            let mut l = ledger(held, *reported);
            let s = settle(l.drain(), *running, *blame);
            assert_eq!(&s.failed, failed, "case {k}: failed");
            assert_eq!(ranges(&s), *again, "case {k}: again");
            assert!(l.is_empty());
        }
    }

    #[test]
    fn report_checks_order_and_completes_chunks() {
        let mut l = ledger(&[(1, 10, 2, 6), (1, 20, 0, 3)], 0);
        assert_eq!(
            l.report(1, 0, 1),
            Err("results out of order"),
            "not the oldest chunk"
        );
        assert_eq!(l.report(0, 3, 1), Err("results out of order"), "a gap");
        assert_eq!(
            l.report(0, 2, 5),
            Err("results out of order"),
            "past the end"
        );
        assert_eq!(
            l.report(0, 2, 3),
            Ok(Reported {
                job: 1,
                index: 12,
                completes: false
            })
        );
        assert_eq!(
            l.report(0, 5, 1),
            Ok(Reported {
                job: 1,
                index: 15,
                completes: true
            })
        );
        assert_eq!(l.len(), 1);
        assert_eq!(l.assigned(), 7);
        assert_eq!(l.report(1, 0, 3).map(|r| r.completes), Ok(true));
        assert_eq!(l.report(1, 0, 1), Err("results for no chunk"));
    }
}

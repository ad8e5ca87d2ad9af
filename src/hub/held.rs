//! A record's notifications in two allocations, whatever their number: a 16-byte head per notification (its
//! offset, log time and where its body ends) and their bodies back to back — no pointer, allocation or
//! reference count per notification. Heads are searched by offset (a watch resumes in O(log n)).
//!
//! Both grow exactly while they are small (most records hold a handful) and by doubling past [`EXACT_UP_TO`]
//! bytes, so a request capped at many notifications is not copied in full on each one.

/// Up to this size a buffer holds exactly what it needs.
const EXACT_UP_TO: usize = 4096;

/// See the module documentation.
#[derive(Default)]
pub(super) struct HeldList {
    heads: Vec<Head>,
    bodies: Vec<u8>,
}

#[derive(Clone, Copy)]
struct Head {
    time_ms: u64,
    /// Offsets are at most the per-request cap (≤ 1,000,000), assigned by the log.
    offset: u32,
    /// Where its body ends in `bodies`; the top bit is [`Held::sourced`].
    end: u32,
}

/// The bit of [`Head::end`] that says [`Held::sourced`].
const SOURCED: u32 = 1 << 31;

/// One notification read from a [`HeldList`].
pub(super) struct Held<'a> {
    pub offset: u64,
    pub time_ms: u64,
    pub body: &'a [u8],
    /// The body was kept without its app and project, which are the record's.
    pub sourced: bool,
}

/// Why a notification cannot be held.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Unheld {
    /// Its offset is past any the log assigns (the per-request cap is far below `u32::MAX`).
    Offset,
    /// The record's bodies would pass 2 GiB.
    Size,
}

impl HeldList {
    /// Appends a notification; offsets must ascend (the caller checks against [`HeldList::last_offset`]).
    pub fn push(&mut self, offset: u64, time_ms: u64, body: &[u8], sourced: bool) -> Result<(), Unheld> {
        let offset = u32::try_from(offset).map_err(|_| Unheld::Offset)?;
        let end = u32::try_from(self.bodies.len() + body.len())
            .ok()
            .filter(|end| end & SOURCED == 0)
            .ok_or(Unheld::Size)?;
        grow(&mut self.heads, 1);
        grow(&mut self.bodies, body.len());
        self.bodies.extend_from_slice(body);
        self.heads.push(Head {
            time_ms,
            offset,
            end: if sourced { end | SOURCED } else { end },
        });
        Ok(())
    }

    /// The held notifications past `offset`, ascending.
    pub fn after(&self, offset: u64) -> impl Iterator<Item = Held<'_>> {
        (self.first_after(offset)..self.heads.len()).map(|i| self.read(i))
    }

    /// Where the heads past `offset` begin. Searched from the newest, in steps that double: a watch reads just
    /// behind the newest, so it touches the last head or two, where a binary search over a large record would
    /// touch a cold cache line at each of its steps (most of a delivery's time in the hub, in the profiles).
    fn first_after(&self, offset: u64) -> usize {
        let passed = |i: usize| u64::from(self.heads[i].offset) <= offset;
        // heads[..low] are passed, heads[high..] are past `offset`.
        let (mut low, mut high, mut step) = (0, self.heads.len(), 1);
        while high > 0 {
            let probe = high.saturating_sub(step);
            if passed(probe) {
                low = probe + 1;
                break;
            }
            high = probe;
            step *= 2;
        }
        low + self.heads[low..high].partition_point(|head| u64::from(head.offset) <= offset)
    }

    /// The offsets held, ascending.
    #[cfg(test)]
    pub fn offsets(&self) -> Vec<u64> {
        self.heads.iter().map(|head| u64::from(head.offset)).collect()
    }

    /// The offset of the last notification held.
    pub fn last_offset(&self) -> Option<u64> {
        self.heads.last().map(|head| u64::from(head.offset))
    }

    /// Drops the notifications whose log time is at or before `cutoff_ms` (they lead: the log's time ascends);
    /// whether any was.
    pub fn drop_until(&mut self, cutoff_ms: u64) -> bool {
        let kept = self.heads.partition_point(|head| head.time_ms <= cutoff_ms);
        if kept == 0 {
            return false;
        }
        let cut = self.heads[kept - 1].end & !SOURCED;
        self.heads.drain(..kept);
        self.bodies.drain(..cut as usize);
        for head in &mut self.heads {
            head.end -= cut;
        }
        self.heads.shrink_to_fit();
        self.bodies.shrink_to_fit();
        true
    }

    fn read(&self, i: usize) -> Held<'_> {
        let head = self.heads[i];
        let start = i.checked_sub(1).map_or(0, |p| (self.heads[p].end & !SOURCED) as usize);
        Held {
            offset: u64::from(head.offset),
            time_ms: head.time_ms,
            body: &self.bodies[start..(head.end & !SOURCED) as usize],
            sourced: head.end & SOURCED != 0,
        }
    }
}

/// Makes room for `more` elements: exactly while the vector is small, by doubling after.
fn grow<T>(vec: &mut Vec<T>, more: usize) {
    if (vec.len() + more) * size_of::<T>() <= EXACT_UP_TO {
        vec.reserve_exact(more);
    } else {
        vec.reserve(more);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[(u64, u64, &[u8])]) -> HeldList {
        let mut list = HeldList::default();
        for &(offset, time_ms, body) in entries {
            list.push(offset, time_ms, body, offset % 2 == 0).unwrap();
        }
        list
    }

    fn read(list: &HeldList, after: u64) -> Vec<(u64, u64, Vec<u8>)> {
        list.after(after)
            .inspect(|h| assert_eq!(h.sourced, h.offset % 2 == 0))
            .map(|h| (h.offset, h.time_ms, h.body.to_vec()))
            .collect()
    }

    #[test]
    fn what_is_pushed_reads_back_in_order_from_any_offset_with_empty_bodies_too() {
        let list = list(&[(1, 10, b"abc"), (2, 20, b""), (5, 30, b"xyz!")]);
        assert_eq!(
            read(&list, 0),
            vec![(1, 10, b"abc".to_vec()), (2, 20, vec![]), (5, 30, b"xyz!".to_vec())]
        );
        assert_eq!(read(&list, 2), vec![(5, 30, b"xyz!".to_vec())]);
        assert_eq!(read(&list, 3), vec![(5, 30, b"xyz!".to_vec())]);
        assert!(read(&list, 5).is_empty());
        assert_eq!(list.last_offset(), Some(5));
        assert_eq!(HeldList::default().last_offset(), None);
    }

    #[test]
    fn reading_from_any_offset_finds_what_is_past_it_however_the_offsets_are_spaced() {
        for len in 0..70u64 {
            // Offsets one after the other, and gaps of 3, as capped or lost notifications leave them.
            let offsets: Vec<u64> = (1..=len).map(|i| i * 2 + i % 2).collect();
            let mut list = HeldList::default();
            for &offset in &offsets {
                list.push(offset, offset, b"x", false).unwrap();
            }
            let last = offsets.last().copied().unwrap_or(0);
            for from in 0..=last + 1 {
                let read: Vec<u64> = list.after(from).map(|h| h.offset).collect();
                let past: Vec<u64> = offsets.iter().copied().filter(|o| *o > from).collect();
                assert_eq!(read, past, "{len} held, read after {from}");
            }
        }
    }

    #[test]
    fn dropping_the_expired_keeps_the_rest_intact() {
        let mut list = list(&[(1, 10, b"a"), (2, 20, b"bb"), (3, 30, b"ccc"), (4, 40, b"dddd")]);
        list.drop_until(20);
        assert_eq!(
            read(&list, 0),
            vec![(3, 30, b"ccc".to_vec()), (4, 40, b"dddd".to_vec())]
        );
        list.drop_until(20);
        assert_eq!(list.offsets(), [3, 4]);
        list.drop_until(u64::MAX);
        assert!(read(&list, 0).is_empty());
    }

    #[test]
    fn an_offset_past_what_the_log_assigns_is_refused_not_truncated() {
        let mut list = HeldList::default();
        assert_eq!(list.push(u64::from(u32::MAX) + 1, 1, b"x", false), Err(Unheld::Offset));
        assert_eq!(list.last_offset(), None);
    }

    #[test]
    fn a_large_record_grows_by_doubling_not_by_copying_each_time() {
        let mut list = HeldList::default();
        let body = [7u8; 100];
        let mut growths = 0;
        for offset in 1..=10_000 {
            let capacity = (list.heads.capacity(), list.bodies.capacity());
            list.push(offset, offset, &body, false).unwrap();
            growths += usize::from((list.heads.capacity(), list.bodies.capacity()) != capacity);
        }
        assert_eq!(list.after(0).count(), 10_000);
        assert!(
            growths < 400,
            "the buffers were reallocated {growths} times for 10,000 notifications"
        );
    }
}

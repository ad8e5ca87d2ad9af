//! A record's notifications, back to back in one allocation: no pointer, allocation or reference count per
//! notification, only a 20-byte header before its compact encoding.
//!
//! Each notification is its offset (u64), its log time in milliseconds (u64) and its body's length (u32, whose
//! top bit says [`Held::sourced`]), little endian, then the body. A record holds a handful, so reading one means walking from the first. The buffer
//! grows exactly while it is small (most records) and by doubling past [`EXACT_UP_TO`], so that a request
//! capped at many notifications is not copied in full on each one.

/// The bytes before each body.
const HEADER: usize = 20;
/// Up to this size the buffer holds exactly what it needs.
const EXACT_UP_TO: usize = 4096;
/// The bit of the length word that says [`Held::sourced`].
const SOURCED: u32 = 1 << 31;

/// See the module documentation.
#[derive(Default)]
pub(super) struct HeldList(Vec<u8>);

/// One notification read from a [`HeldList`].
pub(super) struct Held<'a> {
    pub offset: u64,
    pub time_ms: u64,
    pub body: &'a [u8],
    /// The body was kept without its app and project, which are the record's.
    pub sourced: bool,
    /// Where the next notification starts.
    end: usize,
}

impl HeldList {
    /// Appends a notification; offsets must ascend (the caller checks against [`HeldList::last_offset`]).
    pub fn push(&mut self, offset: u64, time_ms: u64, body: &[u8], sourced: bool) {
        let added = HEADER + body.len();
        if self.0.len() + added <= EXACT_UP_TO {
            self.0.reserve_exact(added);
        } else {
            self.0.reserve(added);
        }
        self.0.extend_from_slice(&offset.to_le_bytes());
        self.0.extend_from_slice(&time_ms.to_le_bytes());
        let len = u32::try_from(body.len())
            .ok()
            .filter(|len| len & SOURCED == 0)
            .expect("a notification body is far below 2 GiB");
        let word = if sourced { len | SOURCED } else { len };
        self.0.extend_from_slice(&word.to_le_bytes());
        self.0.extend_from_slice(body);
    }

    /// The held notifications, by ascending offset.
    pub fn iter(&self) -> impl Iterator<Item = Held<'_>> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let held = self.read(at)?;
            at = held.end;
            Some(held)
        })
    }

    /// The offset of the last notification held.
    pub fn last_offset(&self) -> Option<u64> {
        self.iter().last().map(|held| held.offset)
    }

    /// Drops the leading notifications for which `expired` holds.
    pub fn drop_while(&mut self, mut expired: impl FnMut(&Held<'_>) -> bool) {
        let kept_from = self
            .iter()
            .take_while(|held| expired(held))
            .last()
            .map_or(0, |held| held.end);
        if kept_from > 0 {
            self.0.drain(..kept_from);
            self.0.shrink_to_fit();
        }
    }

    fn read(&self, at: usize) -> Option<Held<'_>> {
        let header = self.0.get(at..at + HEADER)?;
        let word = |from: usize| u64::from_le_bytes(header[from..from + 8].try_into().expect("8 bytes"));
        let len_word = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
        let len = (len_word & !SOURCED) as usize;
        let start = at + HEADER;
        Some(Held {
            offset: word(0),
            time_ms: word(8),
            body: &self.0[start..start + len],
            sourced: len_word & SOURCED != 0,
            end: start + len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[(u64, u64, &[u8])]) -> HeldList {
        let mut list = HeldList::default();
        for &(offset, time_ms, body) in entries {
            list.push(offset, time_ms, body, offset % 2 == 0);
        }
        list
    }

    fn read(list: &HeldList) -> Vec<(u64, u64, Vec<u8>)> {
        list.iter()
            .inspect(|h| assert_eq!(h.sourced, h.offset % 2 == 0))
            .map(|h| (h.offset, h.time_ms, h.body.to_vec()))
            .collect()
    }

    #[test]
    fn what_is_pushed_reads_back_in_order_with_empty_bodies_too() {
        let list = list(&[(1, 10, b"abc"), (2, 20, b""), (5, 30, b"xyz!")]);
        assert_eq!(
            read(&list),
            vec![(1, 10, b"abc".to_vec()), (2, 20, vec![]), (5, 30, b"xyz!".to_vec())]
        );
        assert_eq!(list.last_offset(), Some(5));
        assert_eq!(HeldList::default().last_offset(), None);
    }

    #[test]
    fn dropping_the_expired_keeps_the_rest_intact() {
        let mut list = list(&[(1, 10, b"a"), (2, 20, b"bb"), (3, 30, b"ccc")]);
        list.drop_while(|h| h.time_ms <= 20);
        assert_eq!(read(&list), vec![(3, 30, b"ccc".to_vec())]);
        list.drop_while(|h| h.time_ms <= 20);
        assert_eq!(read(&list), vec![(3, 30, b"ccc".to_vec())]);
        list.drop_while(|_| true);
        assert!(read(&list).is_empty());
    }

    #[test]
    fn a_large_record_grows_by_doubling_not_by_copying_each_time() {
        let mut list = HeldList::default();
        let body = [7u8; 100];
        let mut growths = 0;
        for offset in 1..=10_000 {
            let capacity = list.0.capacity();
            list.push(offset, offset, &body, false);
            growths += usize::from(list.0.capacity() != capacity);
        }
        assert_eq!(list.iter().count(), 10_000);
        assert!(
            growths < 60,
            "the buffer was reallocated {growths} times for 10,000 notifications"
        );
    }
}

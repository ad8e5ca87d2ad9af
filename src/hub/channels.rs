//! A small set of channels: a bit per channel this version knows, and a list for the others.

use crate::capability::Channel;

use std::num::NonZeroU32;

/// A set of channels in 16 bytes, and an optional one too: most records hold one to three known channels and no
/// other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChannelSet {
    /// Bit `n` for the known channel whose contract number is `n` (below 31), and [`ChannelSet::MARK`] always:
    /// never zero, so that `Option<ChannelSet>` takes no more room than a set.
    known: NonZeroU32,
    /// Channels this version does not know, by Sinch's spelling; allocated only when there is one.
    #[expect(
        clippy::box_collection,
        reason = "a thin pointer keeps the set at 16 bytes; a Vec or boxed slice here would make it 24 or 32"
    )]
    other: Option<Box<Vec<Box<str>>>>,
}

impl Default for ChannelSet {
    fn default() -> ChannelSet {
        ChannelSet {
            known: ChannelSet::MARK,
            other: None,
        }
    }
}

impl ChannelSet {
    /// The bit every set has, which no channel has.
    const MARK: NonZeroU32 = NonZeroU32::new(1 << 31).expect("not zero");

    /// The known channels' bits.
    fn bits(&self) -> u32 {
        self.known.get() & !Self::MARK.get()
    }

    pub(super) fn insert(&mut self, channel: &Channel) {
        match channel {
            Channel::Other(raw) => {
                let other = self.other.get_or_insert_default();
                if !other.iter().any(|o| o == raw) {
                    other.push(raw.clone());
                }
            }
            known => self.known |= 1 << known.number(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bits() == 0 && self.others().is_empty()
    }

    pub(super) fn remove(&mut self, channel: &Channel) {
        match channel {
            Channel::Other(raw) => {
                if let Some(other) = &mut self.other {
                    other.retain(|o| o != raw);
                }
            }
            known => self.known = NonZeroU32::new(self.known.get() & !(1 << known.number())).expect("the mark stays"),
        }
    }

    pub(super) fn contains(&self, channel: &Channel) -> bool {
        match channel {
            Channel::Other(raw) => self.others().contains(raw),
            known => self.bits() & (1 << known.number()) != 0,
        }
    }

    /// The channels of `self` that are not in `other`, as a set.
    pub(super) fn minus(&self, other: &ChannelSet) -> ChannelSet {
        self.without(other).iter().collect()
    }

    fn others(&self) -> &[Box<str>] {
        self.other.as_deref().map_or(&[], Vec::as_slice)
    }

    /// The channels of `self` that are not in `other`, known ones in the contract's order first.
    pub(super) fn without(&self, other: &ChannelSet) -> Vec<Channel> {
        let known = self.bits() & !other.bits();
        Channel::KNOWN
            .iter()
            .filter(|c| known & (1 << c.number()) != 0)
            .cloned()
            .chain(
                self.others()
                    .iter()
                    .filter(|raw| !other.others().contains(raw))
                    .map(|raw| Channel::Other(raw.clone())),
            )
            .collect()
    }
}

impl<'a> FromIterator<&'a Channel> for ChannelSet {
    fn from_iter<I: IntoIterator<Item = &'a Channel>>(channels: I) -> ChannelSet {
        let mut set = ChannelSet::default();
        channels.into_iter().for_each(|c| set.insert(c));
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_and_an_optional_one_take_16_bytes_and_every_known_channel_fits() {
        assert_eq!(size_of::<Option<ChannelSet>>(), 16);
        assert!(Channel::KNOWN.iter().all(|c| (1..31).contains(&c.number())));
        let all: ChannelSet = Channel::KNOWN.iter().collect();
        assert_eq!(all.without(&ChannelSet::default()), Channel::KNOWN);
        assert_eq!(all.minus(&all), ChannelSet::default());
    }

    #[test]
    fn known_and_unknown_channels_are_both_counted() {
        let expected: ChannelSet = [Channel::Sms, Channel::from_sinch("NEWCHAN"), Channel::Whatsapp]
            .iter()
            .collect();
        let reported: ChannelSet = [Channel::Sms].iter().collect();
        assert_eq!(
            expected.without(&reported),
            [Channel::Whatsapp, Channel::from_sinch("NEWCHAN")]
        );
        let all: ChannelSet = [Channel::Sms, Channel::Whatsapp, Channel::from_sinch("NEWCHAN")]
            .iter()
            .collect();
        assert!(expected.without(&all).is_empty());
    }
}

//! A small set of channels: a bit per channel this version knows, and a list for the others.

use crate::capability::Channel;

/// A set of channels in 16 bytes: most records hold one to three known channels and no other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct ChannelSet {
    /// Bit `n` for the known channel whose contract number is `n`.
    known: u32,
    /// Channels this version does not know, by Sinch's spelling; allocated only when there is one.
    #[allow(
        clippy::box_collection,
        reason = "a thin pointer keeps the set at 16 bytes; a Vec would take 24"
    )]
    other: Option<Box<Vec<Box<str>>>>,
}

impl ChannelSet {
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

    fn others(&self) -> &[Box<str>] {
        self.other.as_deref().map_or(&[], Vec::as_slice)
    }

    /// The channels of `self` that are not in `other`, known ones in the contract's order first.
    pub(super) fn without(&self, other: &ChannelSet) -> Vec<Channel> {
        let known = self.known & !other.known;
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

//! Domain types of a capability query and its results. No transport crate appears here.
//!
//! Channels and statuses are enums with an `Other` variant that keeps what Sinch sent, so a value Sinch adds
//! tomorrow travels on unchanged. Each enum is generated from one list that holds, per value, Sinch's spelling
//! and the number of the contract's enum value: the only place the three meet.

use std::{
    fmt,
    time::{Duration, SystemTime},
};

/// The longest `request_id` a caller may choose (AIP-155 allows any string; we bound it).
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// The most channel identities one query may carry: Sinch calls back once for each.
pub const MAX_IDENTITIES: usize = 100;

/// Declares a Sinch enumeration: the variants, Sinch's spelling of each and its number in the contract.
macro_rules! sinch_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = ($number:literal, $sinch:literal),)+ }) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
            /// A value this version does not know, as Sinch spelled it.
            Other(Box<str>),
        }

        impl $name {
            /// Every value this version knows, in the contract's order.
            pub const KNOWN: &'static [$name] = &[$($name::$variant,)+];

            /// The value Sinch spells `sinch`; `Other` when this version does not know it.
            pub fn from_sinch(sinch: &str) -> $name {
                match sinch {
                    $($sinch => $name::$variant,)+
                    other => $name::Other(other.into()),
                }
            }

            /// Sinch's spelling.
            pub fn as_sinch(&self) -> &str {
                match self {
                    $($name::$variant => $sinch,)+
                    $name::Other(raw) => raw,
                }
            }

            /// The number of the contract's enum value; 0 (`…_UNSPECIFIED`) for `Other`.
            pub fn number(&self) -> i32 {
                match self {
                    $($name::$variant => $number,)+
                    $name::Other(_) => 0,
                }
            }

            /// The value whose contract number is `number`; `None` for 0 and numbers this version does not know.
            pub fn from_number(number: i32) -> Option<$name> {
                match number {
                    $($number => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_sinch())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_sinch())
            }
        }
    };
}

sinch_enum! {
    /// A messaging channel of the Sinch Conversation API.
    Channel {
        /// WhatsApp Business.
        Whatsapp = (1, "WHATSAPP"),
        /// Rich Communication Services.
        Rcs = (2, "RCS"),
        /// SMS.
        Sms = (3, "SMS"),
        /// Facebook Messenger.
        Messenger = (4, "MESSENGER"),
        /// Viber Business Messages.
        Viberbm = (5, "VIBERBM"),
        /// MMS.
        Mms = (6, "MMS"),
        /// Instagram.
        Instagram = (7, "INSTAGRAM"),
        /// Telegram.
        Telegram = (8, "TELEGRAM"),
        /// KakaoTalk.
        Kakaotalk = (9, "KAKAOTALK"),
        /// KakaoTalk chat.
        Kakaotalkchat = (10, "KAKAOTALKCHAT"),
        /// LINE.
        Line = (11, "LINE"),
        /// WeChat.
        Wechat = (12, "WECHAT"),
        /// Apple Messages for Business.
        Applebc = (13, "APPLEBC"),
        /// Viber, as one of Sinch's SDKs spells it.
        Viber = (14, "VIBER"),
    }
}

sinch_enum! {
    /// Whether a recipient can be reached on a channel.
    CapabilityStatus {
        /// Sinch could not tell.
        Unknown = (1, "CAPABILITY_UNKNOWN"),
        /// Reachable with every capability of the channel.
        Full = (2, "CAPABILITY_FULL"),
        /// Reachable with some capabilities.
        Partial = (3, "CAPABILITY_PARTIAL"),
        /// Not reachable on the channel.
        NoCapability = (4, "NO_CAPABILITY"),
    }
}

/// How long a cached result of each status is trusted; zero caches nothing of that status. Results of statuses
/// this version does not know are never cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTtl {
    pub full: Duration,
    pub partial: Duration,
    pub no_capability: Duration,
    pub unknown: Duration,
}

impl Default for CacheTtl {
    /// Reachability changes slowly (a day); a negative answer is asked again sooner (six hours); Sinch's "could
    /// not tell" is not worth keeping.
    fn default() -> CacheTtl {
        const HOUR: u64 = 3600;
        CacheTtl {
            full: Duration::from_secs(24 * HOUR),
            partial: Duration::from_secs(24 * HOUR),
            no_capability: Duration::from_secs(6 * HOUR),
            unknown: Duration::ZERO,
        }
    }
}

impl CacheTtl {
    /// The time to live of a result of `status`; `None` when such a result is not cached.
    pub fn of(&self, status: &CapabilityStatus) -> Option<Duration> {
        let ttl = match status {
            CapabilityStatus::Full => self.full,
            CapabilityStatus::Partial => self.partial,
            CapabilityStatus::NoCapability => self.no_capability,
            CapabilityStatus::Unknown => self.unknown,
            CapabilityStatus::Other(_) => Duration::ZERO,
        };
        Some(ttl).filter(|ttl| !ttl.is_zero())
    }

    /// The longest time to live of any status: no result is kept longer.
    pub fn longest(&self) -> Duration {
        self.full.max(self.partial).max(self.no_capability).max(self.unknown)
    }

    /// Sets the time to live of `status`.
    pub fn set(&mut self, status: &CapabilityStatus, ttl: Duration) {
        match status {
            CapabilityStatus::Full => self.full = ttl,
            CapabilityStatus::Partial => self.partial = ttl,
            CapabilityStatus::NoCapability => self.no_capability = ttl,
            CapabilityStatus::Unknown => self.unknown = ttl,
            CapabilityStatus::Other(_) => {}
        }
    }
}

/// The order in which reachable channels are recommended, best first. Channels not listed rank after the listed
/// ones, in the contract's enum order (channels this version does not know last, by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelOrder(pub Vec<Channel>);

impl ChannelOrder {
    /// The rank of `channel`: lower is better.
    pub fn rank(&self, channel: &Channel) -> (usize, i32, Box<str>) {
        match self.0.iter().position(|c| c == channel) {
            Some(at) => (at, 0, "".into()),
            None if channel.number() > 0 => (self.0.len(), channel.number(), "".into()),
            None => (self.0.len(), i32::MAX, channel.as_sinch().into()),
        }
    }
}

impl Channel {
    /// Whether `raw` could be a channel name as Sinch spells them: upper-case letters, digits and `_`, 1 to 64.
    pub fn is_well_formed(raw: &str) -> bool {
        !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    }
}

/// A capability query, validated, with its `request_id` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub app_id: String,
    pub recipient: Recipient,
    pub request_id: String,
}

impl Query {
    /// Whether `other` asks the same thing; the request_id is not part of the question.
    pub fn same_question(&self, other: &Query) -> bool {
        self.app_id == other.app_id && self.recipient == other.recipient
    }

    /// The channels that will report, when they are known in advance (identified_by queries), each once, sorted.
    /// Not known when a channel is listed with two different identities: each may report, and a watch that
    /// completed at the first would miss the other (it ends at its wait instead).
    pub fn expected_channels(&self) -> Option<Vec<Channel>> {
        match &self.recipient {
            Recipient::ContactId(_) => None,
            Recipient::IdentifiedBy(ids) => {
                let mut listed: Vec<(&Channel, &str)> =
                    ids.iter().map(|id| (&id.channel, id.identity.as_str())).collect();
                listed.sort();
                listed.dedup();
                let mut channels: Vec<Channel> = listed.iter().map(|(channel, _)| (*channel).clone()).collect();
                channels.dedup();
                (channels.len() == listed.len()).then_some(channels)
            }
        }
    }
}

/// Who a query is about.
#[derive(Clone, PartialEq, Eq)]
pub enum Recipient {
    ContactId(String),
    IdentifiedBy(Vec<ChannelIdentity>),
}

impl Recipient {
    /// How many channel identities a query of it asks about (a contact counts as one: its channels are not known
    /// in advance).
    pub fn identities(&self) -> u32 {
        match self {
            Recipient::ContactId(_) => 1,
            Recipient::IdentifiedBy(ids) => ids.len() as u32,
        }
    }
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recipient::ContactId(id) => write!(f, "ContactId({})", mask(id)),
            Recipient::IdentifiedBy(ids) => f.debug_tuple("IdentifiedBy").field(ids).finish(),
        }
    }
}

/// One identity of a recipient on one channel.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ChannelIdentity {
    pub channel: Channel,
    pub identity: String,
    /// For app-scoped identities; empty when not set.
    pub app_id: String,
}

impl fmt::Debug for ChannelIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.channel, mask(&self.identity))
    }
}

/// Sinch's acknowledgement of a query: the query echoed with its request_id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryAccepted {
    pub app_id: String,
    pub recipient: Recipient,
    pub request_id: String,
}

/// One capability result, as Sinch reported it in a CAPABILITY callback. Every field is optional at Sinch;
/// missing text is empty here, a missing channel or status is `Other("")`.
#[derive(Clone, PartialEq, Eq)]
pub struct Notification {
    pub request_id: String,
    pub contact_id: String,
    pub channel: Channel,
    pub identity: String,
    pub capability_status: CapabilityStatus,
    pub channel_capabilities: Vec<String>,
    pub reason: Option<Reason>,
    pub channel_recipient_identities: Vec<RecipientIdentity>,
    pub app_id: String,
    pub project_id: String,
    pub accepted_time: Option<SystemTime>,
    pub event_time: Option<SystemTime>,
    pub message_metadata: String,
    pub correlation_id: String,
    /// When a replica of this service first received the callback.
    pub received_time: SystemTime,
}

impl fmt::Debug for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notification")
            .field("request_id", &self.request_id)
            .field("channel", &self.channel)
            .field("identity", &mask(&self.identity))
            .field("capability_status", &self.capability_status)
            .finish_non_exhaustive()
    }
}

/// Why a recipient is not (fully) reachable on a channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reason {
    pub code: String,
    pub description: String,
    pub sub_code: String,
    pub channel_code: String,
}

/// A recipient's identity on a channel, as a notification reports it.
#[derive(Clone, PartialEq, Eq)]
pub struct RecipientIdentity {
    pub channel: Channel,
    pub identity: String,
    pub app_id: String,
    pub display_name: String,
}

impl fmt::Debug for RecipientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.channel, mask(&self.identity))
    }
}

/// Masks an identity or phone number for logs: the first four and last two characters stay, the rest become
/// `*` (`46712312312` → `4671*****12`). Short values are masked whole.
pub fn mask(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() <= 6 {
        return "*".repeat(chars.len());
    }
    let hidden = chars.len() - 6;
    chars[..4]
        .iter()
        .chain(std::iter::repeat_n(&'*', hidden))
        .chain(&chars[chars.len() - 2..])
        .collect()
}

/// Masks, in free text from a caller or a callback (a request_id, a channel name Sinch sent), every run of 8 or
/// more digits as [`mask`] masks a phone number: the rest stays readable, so that the value can still be found.
pub fn mask_digits(text: &str) -> std::borrow::Cow<'_, str> {
    const LONGEST_SHOWN: usize = 7;
    let runs = text.split(|c: char| !c.is_ascii_digit());
    if runs.clone().all(|run| run.len() <= LONGEST_SHOWN) {
        return text.into();
    }
    let mut masked = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, masked: &mut String| {
        if run.len() > LONGEST_SHOWN {
            masked.push_str(&mask(run));
        } else {
            masked.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            run.push(c);
        } else {
            flush(&mut run, &mut masked);
            masked.push(c);
        }
    }
    flush(&mut run, &mut masked);
    masked.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_digits_hides_only_long_runs_of_digits() {
        assert_eq!(mask_digits("01JDQ3V5K8ZP"), "01JDQ3V5K8ZP");
        assert_eq!(mask_digits("46788888888"), "4678*****88");
        assert_eq!(mask_digits("req-1234567-x"), "req-1234567-x");
        assert_eq!(mask_digits("a12345678b+46712312312"), "a1234**78b+4671*****12");
    }

    #[test]
    fn mask_keeps_only_the_ends_of_a_phone_number() {
        assert_eq!(mask("46712312312"), "4671*****12");
        assert_eq!(mask("123456"), "******");
        assert_eq!(mask(""), "");
    }

    #[test]
    fn debug_output_never_shows_an_identity() {
        let r = Recipient::IdentifiedBy(vec![ChannelIdentity {
            channel: Channel::Whatsapp,
            identity: "46712312312".into(),
            app_id: String::new(),
        }]);
        let shown = format!("{r:?}");
        assert!(!shown.contains("46712312312"), "{shown}");
        assert!(shown.contains("WHATSAPP:4671*****12"), "{shown}");
    }

    #[test]
    fn expected_channels_are_known_only_for_identities() {
        let id = |channel: Channel| ChannelIdentity {
            channel,
            identity: "1".into(),
            app_id: String::new(),
        };
        let other = |channel: Channel| ChannelIdentity {
            identity: "2".into(),
            ..id(channel)
        };
        let q = Query {
            app_id: "a".into(),
            recipient: Recipient::IdentifiedBy(vec![id(Channel::Rcs), id(Channel::Whatsapp), id(Channel::Rcs)]),
            request_id: "r".into(),
        };
        assert_eq!(q.expected_channels(), Some(vec![Channel::Whatsapp, Channel::Rcs]));
        let q = Query {
            recipient: Recipient::IdentifiedBy(vec![id(Channel::Rcs), id(Channel::Sms), other(Channel::Sms)]),
            ..q
        };
        assert_eq!(
            q.expected_channels(),
            None,
            "two identities on one channel may each report"
        );
        let q = Query {
            recipient: Recipient::ContactId("c".into()),
            ..q
        };
        assert_eq!(q.expected_channels(), None);
    }

    #[test]
    fn every_known_value_reads_back_from_its_spelling_and_its_number() {
        for channel in Channel::KNOWN {
            assert_eq!(&Channel::from_sinch(channel.as_sinch()), channel);
            assert_eq!(Channel::from_number(channel.number()).as_ref(), Some(channel));
        }
        for status in CapabilityStatus::KNOWN {
            assert_eq!(&CapabilityStatus::from_sinch(status.as_sinch()), status);
            assert_eq!(CapabilityStatus::from_number(status.number()).as_ref(), Some(status));
        }
        let new = Channel::from_sinch("CARRIER_PIGEON");
        assert_eq!((new.as_sinch(), new.number()), ("CARRIER_PIGEON", 0));
        assert_eq!(Channel::from_number(0), None);
    }
}

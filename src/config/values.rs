//! Typed value parsers for configuration: durations within bounds, URLs, secrets, comma-separated lists.
//! Each error says what was expected; a secret's error never shows the value.

use std::{ffi::OsStr, time::Duration};

use clap::{
    Arg, Command,
    builder::TypedValueParser,
    error::{Error, ErrorKind},
};

use crate::{
    capability::{CacheTtl, CapabilityStatus, Channel, ChannelOrder},
    secret::{Secret, SecretError},
};

/// A duration written the human way (`250ms`, `20s`, `10m`, `1h`), within `[min, max]`.
#[derive(Debug, Clone, Copy)]
pub struct Bounded {
    pub min: Duration,
    pub max: Duration,
}

/// A duration parser accepting `min..=max`.
pub const fn duration(min: Duration, max: Duration) -> Bounded {
    Bounded { min, max }
}

/// Durations used as bounds.
pub const ZERO: Duration = Duration::ZERO;
pub const MS: Duration = Duration::from_millis(1);
pub const SECOND: Duration = Duration::from_secs(1);
pub const MINUTE: Duration = Duration::from_secs(60);
pub const HOUR: Duration = Duration::from_secs(3600);
pub const DAY: Duration = Duration::from_secs(86_400);

impl TypedValueParser for Bounded {
    type Value = Duration;

    fn parse_ref(&self, cmd: &Command, arg: Option<&Arg>, value: &OsStr) -> Result<Duration, Error> {
        let text = value.to_string_lossy();
        let duration = humantime::parse_duration(text.trim()).map_err(|e| {
            invalid(
                cmd,
                format!("expected a duration such as 250ms, 20s or 10m, got {text:?} ({e})"),
                arg,
            )
        })?;
        if duration < self.min || duration > self.max {
            return Err(invalid(
                cmd,
                format!(
                    "{text:?} is outside {} to {}",
                    humantime::format_duration(self.min),
                    humantime::format_duration(self.max)
                ),
                arg,
            ));
        }
        Ok(duration)
    }
}

/// An `http://` or `https://` URL with a host; a trailing `/` is dropped. A base URL ([`HttpUrl::BASE`]), which
/// paths are appended to, has no query and no fragment.
#[derive(Debug, Clone, Copy)]
pub struct HttpUrl {
    base: bool,
}

impl HttpUrl {
    pub const ANY: HttpUrl = HttpUrl { base: false };
    pub const BASE: HttpUrl = HttpUrl { base: true };
}

impl TypedValueParser for HttpUrl {
    type Value = url::Url;

    fn parse_ref(&self, cmd: &Command, arg: Option<&Arg>, value: &OsStr) -> Result<url::Url, Error> {
        let text = value.to_string_lossy();
        let trimmed = text.trim().trim_end_matches('/');
        match url::Url::parse(trimmed) {
            Ok(url) if self.base && (url.query().is_some() || url.fragment().is_some()) => Err(invalid(
                cmd,
                format!("expected a base URL, without a query or a fragment (paths are appended), got {text:?}"),
                arg,
            )),
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(url),
            _ => Err(invalid(
                cmd,
                format!("expected an http:// or https:// URL with a host, got {text:?}"),
                arg,
            )),
        }
    }
}

/// An id that becomes a segment of a URL's path: letters, digits, `-`, `_` and `.` (a project id is a UUID).
#[derive(Debug, Clone, Copy)]
pub struct PathSegment;

impl TypedValueParser for PathSegment {
    type Value = String;

    fn parse_ref(&self, cmd: &Command, arg: Option<&Arg>, value: &OsStr) -> Result<String, Error> {
        let text = Text.parse_ref(cmd, arg, value)?;
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        match text.find(|c: char| !allowed(c)) {
            Some(at) => Err(invalid(
                cmd,
                format!(
                    "only letters, digits, '-', '_' and '.' may appear; found {:?} at byte {at}",
                    &text[at..at + text[at..].chars().next().map_or(1, char::len_utf8)]
                ),
                arg,
            )),
            None => Ok(text),
        }
    }
}

/// A secret read from configuration, and whether a trailing line break was trimmed from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretValue {
    pub secret: Secret,
    pub trimmed: bool,
}

/// Parses a [`SecretValue`] (see [`Secret::from_config`]).
#[derive(Debug, Clone, Copy)]
pub struct SecretParser;

impl TypedValueParser for SecretParser {
    type Value = SecretValue;

    fn parse_ref(&self, cmd: &Command, arg: Option<&Arg>, value: &OsStr) -> Result<SecretValue, Error> {
        let text = value
            .to_str()
            .ok_or_else(|| invalid(cmd, "not UTF-8 (the value is not shown)".into(), arg))?;
        let (secret, trimmed) = Secret::from_config(text).map_err(|e| secret_error(cmd, arg, &e))?;
        Ok(SecretValue { secret, trimmed })
    }
}

/// Comma-separated secrets, spaces around each trimmed, empty entries dropped; a value that is not empty but
/// names none (only commas, spaces or a line break: a mistake, which would read as "none set") is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretList {
    pub secrets: Vec<Secret>,
    pub trimmed: bool,
}

/// Parses a [`SecretList`].
#[derive(Debug, Clone, Copy)]
pub struct SecretListParser;

impl TypedValueParser for SecretListParser {
    type Value = SecretList;

    fn parse_ref(&self, cmd: &Command, arg: Option<&Arg>, value: &OsStr) -> Result<SecretList, Error> {
        let SecretValue { secret, trimmed } = SecretParser.parse_ref(cmd, arg, value)?;
        let secrets = secret
            .expose()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Secret::new)
            .collect::<Vec<_>>();
        if secrets.is_empty() && !value.is_empty() {
            let refused = "names none: only commas, spaces or a line break (unset it for none)";
            return Err(invalid(cmd, refused.into(), arg));
        }
        Ok(SecretList { secrets, trimmed })
    }
}

/// Plain text without control characters, trimmed of spaces.
#[derive(Debug, Clone, Copy)]
pub struct Text;

impl TypedValueParser for Text {
    type Value = String;

    fn parse_ref(&self, cmd: &Command, arg: Option<&Arg>, value: &OsStr) -> Result<String, Error> {
        let text = value
            .to_str()
            .ok_or_else(|| invalid(cmd, "not UTF-8".into(), arg))?
            .trim();
        if let Some(at) = text.find(char::is_control) {
            return Err(invalid(cmd, format!("contains a control character at byte {at}"), arg));
        }
        Ok(text.to_owned())
    }
}

/// `STATUS=duration` pairs, comma-separated, each status spelled as Sinch spells it (`CAPABILITY_FULL=24h`): how
/// long a cached result of each status is trusted. A status not named keeps its default; `0s` caches nothing of
/// that status.
#[derive(Debug, Clone, Copy)]
pub struct CacheTtlParser;

impl TypedValueParser for CacheTtlParser {
    type Value = CacheTtl;

    fn parse_ref(&self, cmd: &Command, arg: Option<&Arg>, value: &OsStr) -> Result<CacheTtl, Error> {
        let text = Text.parse_ref(cmd, arg, value)?;
        let mut ttl = CacheTtl::default();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((status, duration)) = pair.split_once('=') else {
                return Err(invalid(cmd, format!("expected STATUS=duration, got {pair:?}"), arg));
            };
            let known = CapabilityStatus::KNOWN
                .iter()
                .find(|s| s.as_sinch() == status.trim())
                .ok_or_else(|| {
                    let names: Vec<&str> = CapabilityStatus::KNOWN.iter().map(CapabilityStatus::as_sinch).collect();
                    invalid(
                        cmd,
                        format!("unknown status {status:?}: expected one of {}", names.join(", ")),
                        arg,
                    )
                })?;
            let duration = Bounded {
                min: ZERO,
                max: 30 * DAY,
            }
            .parse_ref(cmd, arg, OsStr::new(duration))?;
            ttl.set(known, duration);
        }
        Ok(ttl)
    }
}

/// Comma-separated channel names as Sinch spells them (`RCS,WHATSAPP,SMS`), each known to this version, each once.
#[derive(Debug, Clone, Copy)]
pub struct ChannelListParser;

impl TypedValueParser for ChannelListParser {
    type Value = ChannelOrder;

    fn parse_ref(&self, cmd: &Command, arg: Option<&Arg>, value: &OsStr) -> Result<ChannelOrder, Error> {
        let text = Text.parse_ref(cmd, arg, value)?;
        let mut channels = Vec::new();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let channel = Channel::KNOWN
                .iter()
                .find(|c| c.as_sinch() == name)
                .ok_or_else(|| invalid(cmd, format!("unknown channel {name:?}"), arg))?;
            if channels.contains(channel) {
                return Err(invalid(cmd, format!("{name} is listed twice"), arg));
            }
            channels.push(channel.clone());
        }
        Ok(ChannelOrder(channels))
    }
}

fn secret_error(cmd: &Command, arg: Option<&Arg>, e: &SecretError) -> Error {
    invalid(cmd, e.to_string(), arg)
}

/// A value-validation error whose message is `problem` (the source clap prints after the argument).
fn invalid(cmd: &Command, problem: String, arg: Option<&Arg>) -> Error {
    let mut error = Error::raw(ErrorKind::ValueValidation, problem).with_cmd(cmd);
    if let Some(arg) = arg {
        error.insert(
            clap::error::ContextKind::InvalidArg,
            clap::error::ContextValue::String(arg.to_string()),
        );
    }
    error
}

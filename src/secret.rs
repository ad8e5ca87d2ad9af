//! Values that must never be printed: credentials, webhook secrets, tokens, URLs with passwords.

use std::fmt;

/// A value that must never be printed: its `Debug` shows `***`, and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// Why a secret given in configuration cannot be used. Never contains the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("contains a control character at byte {0} (the value is not shown)")]
    ControlCharacter(usize),
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// Reads a secret from configuration: a trailing line break (common in mounted secret files) is trimmed,
    /// any other control character is refused. Returns whether a line break was trimmed, so that the caller can
    /// say so once.
    pub fn from_config(value: &str) -> Result<(Secret, bool), SecretError> {
        let trimmed = value.trim_end_matches(['\n', '\r']);
        if let Some(at) = trimmed.find(char::is_control) {
            return Err(SecretError::ControlCharacter(at));
        }
        Ok((Secret(trimmed.to_owned()), trimmed.len() != value.len()))
    }

    /// The secret itself, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// For command-line clients: the same rules as [`Secret::from_config`], without saying whether it trimmed.
impl std::str::FromStr for Secret {
    type Err = SecretError;

    fn from_str(value: &str) -> Result<Secret, SecretError> {
        Secret::from_config(value).map(|(secret, _)| secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trailing_newline_is_trimmed_and_other_control_characters_refused() {
        assert_eq!(Secret::from_config("abc\n").unwrap(), (Secret::new("abc"), true));
        assert_eq!(Secret::from_config("abc\r\n").unwrap(), (Secret::new("abc"), true));
        assert_eq!(Secret::from_config("abc").unwrap(), (Secret::new("abc"), false));
        let refused = Secret::from_config("ab\u{1}c").unwrap_err();
        assert_eq!(refused, SecretError::ControlCharacter(2));
        assert!(!refused.to_string().contains("ab"));
        assert_eq!(format!("{:?}", Secret::new("TOPSECRET")), "***");
    }
}

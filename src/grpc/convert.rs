//! Protobuf ⇄ domain conversion, with the validation of what callers send. Every violation names its field by
//! its path in the request, as `google.rpc.BadRequest` expects.

use std::time::Duration;

use prost::Message;

use crate::{
    capability::{
        CapabilityStatus, Channel, ChannelIdentity, ChannelOrder, MAX_IDENTITIES, MAX_REQUEST_ID_LEN, QueryAccepted,
        Recipient,
    },
    check::{
        CheckAnswer, CheckRequest, Source,
        bulk::{JobSpec, JobState, JobStatus, MAX_RECIPIENTS},
    },
    grpc::pb,
    hub::CompletionReason,
    query::QueryRequest,
};

/// The longest app id, contact id or identity accepted.
pub const MAX_FIELD_LEN: usize = 256;

/// One thing wrong with a request: the field's path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

pub fn violation(field: impl Into<String>, description: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.into(),
        description: description.into(),
    }
}

/// Checks a QueryCapability request and turns it into the domain's; every violation found is reported.
pub fn query_request(request: pb::QueryCapabilityRequest) -> Result<QueryRequest, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    check_text(&mut violations, "app_id", &request.app_id, true);
    let recipient = match request.recipient.and_then(|r| r.recipient) {
        None => {
            violations.push(violation(
                "recipient",
                "required: set exactly one of recipient.contact_id or recipient.identified_by",
            ));
            None
        }
        Some(pb::recipient::Recipient::ContactId(id)) => {
            check_text(&mut violations, "recipient.contact_id", &id, true);
            Some(Recipient::ContactId(id))
        }
        Some(pb::recipient::Recipient::IdentifiedBy(by)) => {
            identities(&mut violations, by.channel_identities).map(Recipient::IdentifiedBy)
        }
    };
    violations.extend(check_request_id(&request.request_id, false).err());
    let request_id = (!request.request_id.is_empty()).then_some(request.request_id);
    match recipient {
        Some(recipient) if violations.is_empty() => Ok(QueryRequest {
            app_id: request.app_id,
            recipient,
            request_id,
        }),
        _ => Err(violations),
    }
}

/// Checks a CheckCapability request and turns it into the domain's; every violation found is reported.
/// `default_wait` and `default_max_age` apply when unset; a wait is capped at `max_wait`.
pub fn check_request(
    request: pb::CheckCapabilityRequest,
    defaults: &CheckDefaults,
) -> Result<CheckRequest, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let max_age = match request.max_age {
        None => Some(defaults.max_age),
        Some(d) => max_age(&mut violations, d),
    };
    let wait = wait(request.wait, defaults.wait, defaults.max_wait)
        .map_err(|v| violations.push(v))
        .ok();
    let mut preference = Vec::new();
    let listed = request.channel_preference.len();
    if listed > Channel::KNOWN.len() {
        // Longer than the contract has channels: some are repeated or unknown, and one violation says so (one per
        // entry would let a caller grow the answer with the request).
        violations.push(violation(
            "channel_preference",
            format!("at most {} channels, each once; got {listed}", Channel::KNOWN.len()),
        ));
    }
    for (at, number) in request.channel_preference.iter().enumerate().take(Channel::KNOWN.len()) {
        match Channel::from_number(*number) {
            Some(channel) if !preference.contains(&channel) => preference.push(channel),
            Some(_) => violations.push(violation(format!("channel_preference[{at}]"), "listed twice")),
            None => violations.push(violation(
                format!("channel_preference[{at}]"),
                format!("{number} is not a channel of this contract"),
            )),
        }
    }
    let query = query_request(pb::QueryCapabilityRequest {
        app_id: request.app_id,
        recipient: request.recipient,
        request_id: request.request_id,
    });
    match (query, max_age, wait) {
        (Ok(query), Some(max_age), Some(wait)) if violations.is_empty() => Ok(CheckRequest {
            app_id: query.app_id,
            recipient: query.recipient,
            max_age,
            wait,
            preference: (!preference.is_empty()).then_some(ChannelOrder(preference)),
            request_id: query.request_id,
        }),
        (query, ..) => {
            violations.extend(query.err().unwrap_or_default());
            Err(violations)
        }
    }
}

/// Checks a StartBulkCheck request: an app, 1 to 100,000 recipients each valid as QueryCapability's (named by
/// index), durations as CheckCapability's. At most 100 violations are reported.
pub fn start_bulk_request(
    request: pb::StartBulkCheckRequest,
    defaults: &CheckDefaults,
) -> Result<JobSpec, Vec<FieldViolation>> {
    let first = request.recipients.first().cloned();
    let count = request.recipients.len();
    let check = check_request(
        pb::CheckCapabilityRequest {
            app_id: request.app_id,
            recipient: first,
            max_age: request.max_age,
            wait: request.wait,
            channel_preference: request.channel_preference,
            request_id: request.request_id,
        },
        defaults,
    );
    let mut violations: Vec<FieldViolation> = match &check {
        Ok(_) => Vec::new(),
        // The first recipient's own violations are found again below, by index.
        Err(violations) => violations
            .iter()
            .filter(|v| !v.field.starts_with("recipient"))
            .cloned()
            .collect(),
    };
    if count == 0 || count > MAX_RECIPIENTS {
        violations.push(violation(
            "recipients",
            format!("between 1 and {MAX_RECIPIENTS} recipients are required, got {count}"),
        ));
        return Err(violations);
    }
    let mut recipients = Vec::with_capacity(count);
    for (at, recipient) in request.recipients.into_iter().enumerate() {
        match query_request(pb::QueryCapabilityRequest {
            app_id: "-".into(),
            recipient: Some(recipient),
            request_id: String::new(),
        }) {
            Ok(query) => recipients.push(query.recipient),
            Err(found) if violations.len() < 100 => violations.extend(found.into_iter().map(|v| FieldViolation {
                field: v.field.replacen("recipient", &format!("recipients[{at}]"), 1),
                description: v.description,
            })),
            Err(_) => {}
        }
    }
    match check {
        Ok(check) if violations.is_empty() => Ok(JobSpec {
            app_id: check.app_id,
            recipients,
            max_age: check.max_age,
            wait: check.wait,
            preference: check.preference,
            request_id: check.request_id,
        }),
        _ => Err(violations),
    }
}

/// A bulk check job as the contract carries it.
pub fn bulk_check(status: &JobStatus, now_ms: u64) -> pb::BulkCheck {
    let time = |ms: u64| Some(prost_types::Timestamp::from(crate::log::codec::log_time(ms)));
    pb::BulkCheck {
        job_id: status.job_id.clone(),
        state: match status.state {
            JobState::Running => pb::BulkCheckState::Running,
            JobState::Succeeded => pb::BulkCheckState::Succeeded,
            JobState::Cancelled => pb::BulkCheckState::Cancelled,
            JobState::Failed => pb::BulkCheckState::Failed,
        }
        .into(),
        total: status.total,
        done: status.done,
        from_cache: status.from_cache,
        reachable: status.reachable,
        create_time: time(status.create_ms),
        update_time: time(status.update_ms),
        estimated_remaining: status
            .estimated_remaining(now_ms)
            .and_then(|d| prost_types::Duration::try_from(d).ok()),
        request_id: status.request_id.clone(),
    }
}

/// Checks a job_id given to GetBulkCheck, WatchBulkCheck or CancelBulkCheck.
pub fn job_id(job_id: &str) -> Result<(), Vec<FieldViolation>> {
    if job_id.is_empty() {
        return Err(vec![violation(
            "job_id",
            "required: the job_id StartBulkCheck returned",
        )]);
    }
    if job_id.len() > MAX_FIELD_LEN || job_id.chars().any(char::is_control) {
        return Err(vec![violation("job_id", "not a job_id StartBulkCheck returns")]);
    }
    Ok(())
}

/// The server's defaults for what a CheckCapability leaves unset.
#[derive(Debug, Clone, Copy)]
pub struct CheckDefaults {
    pub max_age: Duration,
    pub wait: Duration,
    pub max_wait: Duration,
}

/// Checks an InvalidateCapability request: an app and a recipient, as QueryCapability's.
pub fn invalidate_request(
    request: pb::InvalidateCapabilityRequest,
) -> Result<(String, Recipient), Vec<FieldViolation>> {
    let query = query_request(pb::QueryCapabilityRequest {
        app_id: request.app_id,
        recipient: request.recipient,
        request_id: String::new(),
    })?;
    Ok((query.app_id, query.recipient))
}

/// A check's answer as the contract carries it.
pub fn check_response(answer: CheckAnswer) -> pb::CheckCapabilityResponse {
    pb::CheckCapabilityResponse {
        results: answer
            .results
            .into_iter()
            .map(|r| pb::ChannelResult {
                notification: Some(notification(r.offset, &r.request_id, &r.body)),
                source: match r.source {
                    Source::Cache => pb::ResultSource::Cache,
                    Source::Live => pb::ResultSource::Live,
                    Source::Shared => pb::ResultSource::Shared,
                }
                .into(),
                checked_at: Some(r.checked_at.into()),
            })
            .collect(),
        complete: answer.complete,
        pending: answer.pending.into_iter().map(channel_identity).collect(),
        pending_lookups: answer
            .pending_lookups
            .into_iter()
            .map(|(identity, request_id)| pb::PendingLookup {
                identity: Some(channel_identity(identity)),
                request_id: request_id.to_string(),
            })
            .collect(),
        recommended: answer.recommended.into_iter().map(channel_identity).collect(),
        request_id: answer.request_id,
    }
}

/// The longest `google.protobuf.Duration`: 10,000 years.
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

/// A non-negative duration of field `field`; `None` (with a violation) otherwise.
fn duration(violations: &mut Vec<FieldViolation>, field: &str, d: prost_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        violations.push(violation(field, "must not be negative"));
        None
    } else if d.nanos >= 1_000_000_000 {
        violations.push(violation(field, "nanos must be below one second"));
        None
    } else {
        Some(Duration::new(d.seconds as u64, d.nanos as u32))
    }
}

/// A check's `max_age`: a [`duration`] within protobuf's range (read as milliseconds, one past it overflowed). A
/// wait has no such bound: it is capped, however long.
fn max_age(violations: &mut Vec<FieldViolation>, d: prost_types::Duration) -> Option<Duration> {
    if d.seconds > MAX_DURATION_SECONDS {
        violations.push(violation(
            "max_age",
            format!("must be at most {MAX_DURATION_SECONDS} seconds (10,000 years, protobuf's Duration range)"),
        ));
        return None;
    }
    duration(violations, "max_age", d)
}

/// A WatchCapability's wait: `default` when absent, never above `max`; negative or malformed durations refused.
pub fn wait(wait: Option<prost_types::Duration>, default: Duration, max: Duration) -> Result<Duration, FieldViolation> {
    let Some(wait) = wait else {
        return Ok(default.min(max));
    };
    let mut violations = Vec::new();
    match duration(&mut violations, "wait", wait) {
        Some(wait) => Ok(wait.min(max)),
        None => Err(violations.remove(0)),
    }
}

/// Checks a request_id: at most 128 characters, no control characters, not only spaces, and present when
/// `required`.
pub fn check_request_id(request_id: &str, required: bool) -> Result<(), FieldViolation> {
    let chars = request_id.chars().count();
    if chars == 0 && required {
        Err(violation(
            "request_id",
            "required: the request_id returned by QueryCapability",
        ))
    } else if chars > 0 && request_id.trim().is_empty() {
        Err(violation(
            "request_id",
            "must not be blank: leave it empty, or name the request",
        ))
    } else if chars > MAX_REQUEST_ID_LEN {
        Err(violation(
            "request_id",
            format!("at most {MAX_REQUEST_ID_LEN} characters, got {chars}"),
        ))
    } else if request_id.chars().any(char::is_control) {
        Err(violation("request_id", "must not contain control characters"))
    } else {
        Ok(())
    }
}

fn identities(violations: &mut Vec<FieldViolation>, ids: Vec<pb::ChannelIdentity>) -> Option<Vec<ChannelIdentity>> {
    const FIELD: &str = "recipient.identified_by.channel_identities";
    if ids.is_empty() {
        violations.push(violation(FIELD, "at least one channel identity is required"));
        return None;
    }
    if ids.len() > MAX_IDENTITIES {
        violations.push(violation(
            FIELD,
            format!("at most {MAX_IDENTITIES} channel identities, got {}", ids.len()),
        ));
        return None;
    }
    let before = violations.len();
    let converted: Vec<ChannelIdentity> = ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let channel = channel_name(violations, &format!("{FIELD}[{i}]"), id.channel, &id.channel_raw);
            check_text(violations, &format!("{FIELD}[{i}].identity"), &id.identity, true);
            check_text(violations, &format!("{FIELD}[{i}].app_id"), &id.app_id, false);
            ChannelIdentity {
                channel: channel.unwrap_or(Channel::Other("".into())),
                identity: id.identity,
                app_id: id.app_id,
            }
        })
        .collect();
    (violations.len() == before).then_some(converted)
}

/// The channel, from the typed value or the raw one.
fn channel_name(violations: &mut Vec<FieldViolation>, path: &str, channel: i32, raw: &str) -> Option<Channel> {
    let typed = match Channel::from_number(channel) {
        Some(c) => Some(c),
        None if channel == pb::Channel::Unspecified as i32 => None,
        None => {
            violations.push(violation(
                format!("{path}.channel"),
                format!("{channel} is not a Channel value; use channel_raw for channels this contract does not list"),
            ));
            return None;
        }
    };
    match (typed, raw) {
        (None, "") => {
            violations.push(violation(
                format!("{path}.channel"),
                "required: set channel (or channel_raw)",
            ));
            None
        }
        (Some(t), "") => Some(t),
        (typed, raw) => {
            if !Channel::is_well_formed(raw) {
                violations.push(violation(
                    format!("{path}.channel_raw"),
                    "must be a channel name as Sinch spells it: upper-case letters, digits and '_', at most 64",
                ));
                return None;
            }
            let named = Channel::from_sinch(raw);
            if typed.is_some_and(|t| t != named) {
                violations.push(violation(
                    format!("{path}.channel_raw"),
                    "names a different channel than channel; set one of them, or both alike",
                ));
                return None;
            }
            Some(named)
        }
    }
}

fn check_text(violations: &mut Vec<FieldViolation>, field: &str, value: &str, required: bool) {
    if value.is_empty() {
        if required {
            violations.push(violation(field, "required"));
        }
    } else if value.trim().is_empty() {
        violations.push(violation(field, "must not be blank (leave it empty to omit it)"));
    } else if value.len() > MAX_FIELD_LEN {
        violations.push(violation(
            field,
            format!("at most {MAX_FIELD_LEN} bytes, got {}", value.len()),
        ));
    } else if value.chars().any(char::is_control) {
        violations.push(violation(field, "must not contain control characters"));
    }
}

pub fn recipient(recipient: Recipient) -> pb::Recipient {
    pb::Recipient {
        recipient: Some(match recipient {
            Recipient::ContactId(id) => pb::recipient::Recipient::ContactId(id),
            Recipient::IdentifiedBy(ids) => pb::recipient::Recipient::IdentifiedBy(pb::IdentifiedBy {
                channel_identities: ids.into_iter().map(channel_identity).collect(),
            }),
        }),
    }
}

pub fn channel_identity(id: ChannelIdentity) -> pb::ChannelIdentity {
    pb::ChannelIdentity {
        channel: id.channel.number(),
        channel_raw: id.channel.as_sinch().to_owned(),
        identity: id.identity,
        app_id: id.app_id,
    }
}

pub fn query_response(accepted: QueryAccepted) -> pb::QueryCapabilityResponse {
    pb::QueryCapabilityResponse {
        app_id: accepted.app_id,
        recipient: Some(recipient(accepted.recipient)),
        request_id: accepted.request_id,
    }
}

/// A notification the hub keeps (its compact encoding is the contract's `CapabilityNotification` without
/// `offset` and `request_id`) as the contract carries it.
pub fn notification(offset: u64, request_id: &str, body: &[u8]) -> pb::CapabilityNotification {
    let mut n = pb::CapabilityNotification::decode(body).unwrap_or_else(|e| {
        tracing::error!(error = %e, "a held notification does not decode; sending what is known");
        pb::CapabilityNotification::default()
    });
    n.offset = offset;
    n.request_id = request_id.to_owned();
    spell_out(
        &mut n.channel_raw,
        Channel::from_number(n.channel).as_ref().map(Channel::as_sinch),
    );
    spell_out(
        &mut n.capability_status_raw,
        CapabilityStatus::from_number(n.capability_status)
            .as_ref()
            .map(CapabilityStatus::as_sinch),
    );
    for id in n
        .channel_recipient_identities
        .iter_mut()
        .filter_map(|r| r.channel_identity.as_mut())
    {
        spell_out(
            &mut id.channel_raw,
            Channel::from_number(id.channel).as_ref().map(Channel::as_sinch),
        );
    }
    n
}

/// Sets a `…_raw` field the log left empty (it keeps only spellings the enum cannot carry) to the known value's.
fn spell_out(raw: &mut String, known: Option<&str>) {
    if let (true, Some(known)) = (raw.is_empty(), known) {
        known.clone_into(raw);
    }
}

/// How a completed watch ended, as the contract says it.
pub fn completion(reason: CompletionReason, last_offset: u64, pending: Vec<Channel>) -> pb::Completion {
    pb::Completion {
        reason: match reason {
            CompletionReason::AllChannelsReported => pb::CompletionReason::AllChannelsReported,
            CompletionReason::WaitElapsed => pb::CompletionReason::WaitElapsed,
        }
        .into(),
        last_offset,
        pending_channels: pending.iter().map(|c| c.as_sinch().to_owned()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(channel: pb::Channel, raw: &str, identity: &str) -> pb::ChannelIdentity {
        pb::ChannelIdentity {
            channel: channel.into(),
            identity: identity.into(),
            app_id: String::new(),
            channel_raw: raw.into(),
        }
    }

    /// What a caller sends must not grow the answer: a preference of 100,000 entries is one violation, not one
    /// per entry.
    #[test]
    fn a_long_channel_preference_is_one_violation() {
        let defaults = CheckDefaults {
            max_age: Duration::from_secs(60),
            wait: Duration::from_secs(10),
            max_wait: Duration::from_secs(60),
        };
        let request = pb::CheckCapabilityRequest {
            app_id: "a".into(),
            recipient: by(vec![identity(pb::Channel::Sms, "", "1")]).recipient,
            channel_preference: vec![pb::Channel::Sms as i32; 100_000],
            ..Default::default()
        };
        let violations = check_request(request, &defaults).unwrap_err();
        assert!(
            violations.len() <= Channel::KNOWN.len() + 1,
            "{} violations",
            violations.len()
        );
        assert!(
            violations.iter().any(|v| v.field == "channel_preference"),
            "{violations:?}"
        );
    }

    /// A max_age past protobuf's range (10,000 years) is refused by name: read as milliseconds it overflowed, so
    /// one meant as "any age" became a few hundred milliseconds — and a bulk job's, stored, changed. A wait that
    /// long is capped, as any wait is.
    #[test]
    fn a_max_age_past_protobufs_range_is_refused() {
        let defaults = CheckDefaults {
            max_age: Duration::from_secs(60),
            wait: Duration::from_secs(10),
            max_wait: Duration::from_secs(60),
        };
        let huge = Some(prost_types::Duration {
            seconds: 18_446_744_073_709_552,
            nanos: 0,
        });
        let request = |max_age, wait| pb::CheckCapabilityRequest {
            app_id: "a".into(),
            recipient: by(vec![identity(pb::Channel::Sms, "", "1")]).recipient,
            max_age,
            wait,
            ..Default::default()
        };
        let violations = check_request(request(huge, None), &defaults).unwrap_err();
        assert!(
            violations
                .iter()
                .any(|v| v.field == "max_age" && v.description.contains("10,000 years")),
            "{violations:?}"
        );
        let capped = check_request(request(None, huge), &defaults).unwrap();
        assert_eq!(capped.wait, defaults.max_wait);
    }

    fn by(ids: Vec<pb::ChannelIdentity>) -> pb::QueryCapabilityRequest {
        pb::QueryCapabilityRequest {
            app_id: "APP".into(),
            recipient: Some(pb::Recipient {
                recipient: Some(pb::recipient::Recipient::IdentifiedBy(pb::IdentifiedBy {
                    channel_identities: ids,
                })),
            }),
            request_id: String::new(),
        }
    }

    fn fields(request: pb::QueryCapabilityRequest) -> Vec<String> {
        query_request(request)
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    /// The domain's list of channels and statuses and the contract's enums are one list: same numbers, and the
    /// contract's names are Sinch's spellings with the enum's prefix.
    #[test]
    fn the_contracts_enums_are_the_domains_lists() {
        for channel in Channel::KNOWN {
            let typed = pb::Channel::try_from(channel.number()).unwrap();
            assert_eq!(typed.as_str_name(), format!("CHANNEL_{}", channel.as_sinch()));
        }
        assert_eq!(
            Channel::KNOWN.len() + 1,
            pb::Channel::Viber as usize + 1,
            "every contract value is known"
        );
        let statuses = [
            ("CAPABILITY_STATUS_UNKNOWN", CapabilityStatus::Unknown),
            ("CAPABILITY_STATUS_FULL", CapabilityStatus::Full),
            ("CAPABILITY_STATUS_PARTIAL", CapabilityStatus::Partial),
            ("CAPABILITY_STATUS_NO_CAPABILITY", CapabilityStatus::NoCapability),
        ];
        for (name, status) in &statuses {
            assert_eq!(
                pb::CapabilityStatus::try_from(status.number()).unwrap().as_str_name(),
                *name
            );
        }
        assert_eq!(CapabilityStatus::KNOWN.len(), statuses.len());
    }

    /// The hub keeps the log's compact encoding and sends it as it stands: it must read as the contract's message.
    #[test]
    fn the_logs_encoding_of_a_notification_reads_as_the_contracts() {
        use crate::log::codec;
        let n = codec::tests::full_notification("r1");
        let mut body = codec::encode_body(&n);
        codec::put_receive_time(1_700_000_000_123, &mut body);
        let sent = notification(7, "r1", &body);
        assert_eq!(sent.offset, 7);
        assert_eq!(sent.request_id, "r1");
        assert_eq!(sent.channel, pb::Channel::Whatsapp as i32);
        assert_eq!(sent.channel_raw, "WHATSAPP");
        assert_eq!(sent.capability_status, pb::CapabilityStatus::Partial as i32);
        assert_eq!(sent.capability_status_raw, "CAPABILITY_PARTIAL");
        assert_eq!(sent.identity, n.identity);
        assert_eq!(sent.contact_id, n.contact_id);
        assert_eq!(sent.channel_capabilities, n.channel_capabilities);
        let reason = sent.reason.unwrap();
        assert_eq!(
            (reason.code.as_str(), reason.channel_code.as_str()),
            ("RECIPIENT_NOT_OPTED_IN", "131047")
        );
        let recipient = &sent.channel_recipient_identities[0];
        assert_eq!(recipient.display_name, "John");
        let id = recipient.channel_identity.as_ref().unwrap();
        assert_eq!((id.channel, id.channel_raw.as_str()), (0, "NEWCHAN"));
        assert_eq!((sent.app_id.as_str(), sent.project_id.as_str()), ("APP", "PRJ"));
        assert_eq!(sent.accepted_time, n.accepted_time.map(Into::into));
        assert_eq!(sent.event_time, n.event_time.map(Into::into));
        assert_eq!(sent.receive_time, Some(codec::log_time(1_700_000_000_123).into()));
        assert_eq!(
            (sent.message_metadata.as_str(), sent.correlation_id.as_str()),
            ("meta", "corr")
        );
    }

    #[test]
    fn a_raw_channel_travels_when_the_enum_does_not_know_it() {
        let q = query_request(by(vec![identity(pb::Channel::Unspecified, "NEWCHAN", "1")])).unwrap();
        let Recipient::IdentifiedBy(ids) = q.recipient else {
            panic!()
        };
        assert_eq!(ids[0].channel, Channel::from_sinch("NEWCHAN"));
    }

    #[test]
    fn violations_name_their_fields() {
        assert_eq!(fields(pb::QueryCapabilityRequest::default()), ["app_id", "recipient"]);
        assert_eq!(fields(by(vec![])), ["recipient.identified_by.channel_identities"]);
        assert_eq!(
            fields(by(vec![
                identity(pb::Channel::Sms, "", "1"),
                identity(pb::Channel::Unspecified, "", ""),
                identity(pb::Channel::Rcs, "SMS", "1"),
            ])),
            [
                "recipient.identified_by.channel_identities[1].channel",
                "recipient.identified_by.channel_identities[1].identity",
                "recipient.identified_by.channel_identities[2].channel_raw",
            ]
        );
        let mut long_id = by(vec![identity(pb::Channel::Sms, "", "1")]);
        long_id.request_id = "x".repeat(129);
        assert_eq!(fields(long_id), ["request_id"]);
    }

    #[test]
    fn a_request_id_of_128_characters_is_accepted() {
        let mut request = by(vec![identity(pb::Channel::Sms, "", "1")]);
        request.request_id = "é".repeat(128);
        assert!(query_request(request).is_ok());
    }

    /// Found by the fuzzer: a whitespace-only optional field skipped every check, so a lone newline travelled
    /// to Sinch as an identity's app_id.
    #[test]
    fn a_blank_optional_field_is_refused_rather_than_forwarded() {
        let mut newline = identity(pb::Channel::Sms, "", "1");
        newline.app_id = "\n".into();
        assert_eq!(
            fields(by(vec![newline])),
            ["recipient.identified_by.channel_identities[0].app_id"]
        );
    }
}

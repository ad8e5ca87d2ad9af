//! `capability-facade bulk-check`: a file of recipients checked in one bulk job (StartBulkCheck), its results
//! written as they come (WatchBulkCheck) with a progress bar, resumable after Ctrl-C or a crash.
//!
//! The input's format is its extension's: CSV (`.csv`) or JSON lines (`.jsonl`, `.ndjson`, `.json`). A row the
//! service would refuse is reported on stderr by its line number (a CSV's header is line 1) and left out; the
//! others make the job. The output's format is `--out`'s extension's (JSON lines on stdout without `--out`): one
//! row per recipient, in the order the job answers them (its offsets 1, 2, …), so the rows already in a file are
//! the offset to resume after.

use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, IsTerminal, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use capability_facade::{
    capability::Channel,
    check::bulk::MAX_RECIPIENTS,
    grpc::{client::BulkError, convert, pb},
};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::signal::unix::{SignalKind, signal};

use super::{BulkCheckArgs, client::prost_duration};

/// The largest StartBulkCheck the service takes.
const MAX_REQUEST_BYTES: usize = capability_facade::grpc::MAX_BULK_MESSAGE;
/// How often a plain progress line is printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// How many times in a row a broken watch is resumed before giving up.
const MAX_RETRIES: u32 = 5;
/// The columns of a CSV output.
const CSV_HEADER: [&str; 6] = ["index", "line", "complete", "recommended", "results", "pending"];
/// The exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
const INTERRUPTED: u8 = 130;
/// The default of `--addr`, left out of the commands printed.
const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// Why the command stops early.
enum Failure {
    /// The command line or an input is wrong: exit status 2.
    Usage(String),
    /// The service refused or could not be reached: exit status 1.
    Service(String),
}

/// `capability-facade bulk-check`: 0 when the job succeeded (whatever the bad rows), 1 when it failed, was
/// cancelled or could not be followed, 2 for a wrong command line or input, 130 on Ctrl-C (the job goes on).
pub async fn bulk_check(args: BulkCheckArgs) -> ExitCode {
    let outcome = if args.cancel {
        cancel(&args).await
    } else {
        run(&args).await
    };
    match outcome {
        Ok(code) => code,
        Err(Failure::Usage(message)) => {
            eprintln!("bulk-check: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Service(message)) => {
            eprintln!("bulk-check failed: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `--job JOB_ID --cancel`.
async fn cancel(args: &BulkCheckArgs) -> Result<ExitCode, Failure> {
    let job_id = args.job.as_deref().unwrap_or_default();
    let mut client = args.connect.connect().await.map_err(Failure::Service)?;
    let job = client.cancel_bulk_check(job_id).await.map_err(service)?;
    let ended = match job.state() {
        pb::BulkCheckState::Cancelled => "",
        _ => " (it had ended already)",
    };
    out!(
        "job {}: {}{ended} ({}/{} done, {} from cache, {} reachable)",
        job.job_id,
        state_name(&job),
        job.done,
        job.total,
        job.from_cache,
        job.reachable
    );
    Ok(ExitCode::SUCCESS)
}

/// Whether `path` can be written, checked by opening it without emptying it (the job's results replace what it
/// holds only once the job started): whether this made it.
fn writable(path: &Path) -> Result<bool, Failure> {
    let cannot = |e: io::Error| Failure::Usage(format!("cannot write to {}: {e}", path.display()));
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            OpenOptions::new().append(true).open(path).map_err(cannot)?;
            Ok(false)
        }
        Err(e) => Err(cannot(e)),
    }
}

fn service(e: BulkError) -> Failure {
    Failure::Service(e.message)
}

async fn run(args: &BulkCheckArgs) -> Result<ExitCode, Failure> {
    let in_path = args.input.as_deref().expect("clap requires --in without --cancel");
    let in_format = Format::of(in_path).map_err(Failure::Usage)?;
    if let Some(out) = &args.output {
        Format::of(out).map_err(Failure::Usage)?;
    }
    let bytes = fs::read(in_path).map_err(|e| Failure::Usage(format!("cannot read {}: {e}", in_path.display())))?;
    let shown = in_path.display().to_string();
    let input = read_input(&bytes, in_format, &mut |line, reason| {
        eprintln!("{shown} line {line}: {reason}; row skipped")
    })
    .map_err(|e| Failure::Usage(format!("{shown}: {e}")))?;
    if !input.ignored_columns.is_empty() {
        eprintln!(
            "{shown}: ignoring the column(s) {} (neither contact_id, channel, identity nor a channel's name)",
            input.ignored_columns.join(", ")
        );
    }
    if input.rows.is_empty() {
        return Err(Failure::Usage(format!(
            "{shown} has no recipient to check ({})",
            bad_rows(input.bad)
        )));
    }
    if input.rows.len() > MAX_RECIPIENTS {
        return Err(Failure::Usage(format!(
            "{shown} has {} recipients; a job takes at most {MAX_RECIPIENTS}: split the file",
            input.rows.len()
        )));
    }

    let mut client = args.connect.connect().await.map_err(Failure::Service)?;
    let (job, mut out, mut written) = match &args.job {
        Some(job_id) => {
            let job = client.get_bulk_check(job_id).await.map_err(service)?;
            // A job this command started is named by a hash of the file and the options (a request_id of the
            // caller's own cannot be told from the file): another file of as many rows would write each result
            // against another row's line.
            let made = derived_request_id(args, &bytes);
            if derived(&job.request_id) && job.request_id != made {
                return Err(Failure::Usage(format!(
                    "job {job_id} was started from another file, or with other options (its request_id is {}, this \
                     command's {made}): give the --in, --app-id, --max-age (or --refresh) and --wait it was started \
                     with",
                    job.request_id
                )));
            }
            if job.total != input.rows.len() as u64 {
                return Err(Failure::Usage(format!(
                    "job {job_id} has {} recipients but {shown} has {}: give the --in (and --app-id) it was started \
                     with",
                    job.total,
                    input.rows.len()
                )));
            }
            let (out, written) = Output::open(args.output.as_deref(), true).map_err(Failure::Usage)?;
            if written > job.total {
                return Err(Failure::Usage(format!(
                    "{} holds {written} results but job {job_id} has {}: not this job's output",
                    out.name, job.total
                )));
            }
            eprintln!(
                "bulk-check: resuming job {job_id} after the {written} results in {}",
                out.name
            );
            (job, out, written)
        }
        None => {
            let request = start_request(args, &bytes, &input);
            if request.encoded_len() > MAX_REQUEST_BYTES {
                return Err(Failure::Usage(format!(
                    "{shown} makes a request over {} MiB: split the file",
                    MAX_REQUEST_BYTES >> 20
                )));
            }
            let request_id = request.request_id.clone();
            // Before the job starts: an output that cannot be written would leave it running unnamed.
            let created = match &args.output {
                Some(path) => writable(path)?,
                None => false,
            };
            let job = match client.start_bulk_check(request).await {
                Ok(job) => job,
                Err(e) => {
                    // Made by this command, and still empty: nobody else's.
                    if let (Some(path), true) = (&args.output, created)
                        && fs::metadata(path).is_ok_and(|m| m.len() == 0)
                    {
                        let _ = fs::remove_file(path);
                    }
                    return Err(service(e));
                }
            };
            let (out, written) = Output::open(args.output.as_deref(), false).map_err(Failure::Usage)?;
            eprintln!(
                "bulk-check: job {} (request_id {request_id}): {} recipients, {} skipped",
                job.job_id,
                job.total,
                bad_rows(input.bad)
            );
            if job.state() != pb::BulkCheckState::Running {
                eprintln!(
                    "bulk-check: job {} was started before under this request_id and had ended {}: its results \
                     follow, as they were then; to check the file again, give --request-id a new value",
                    job.job_id,
                    state_name(&job)
                );
            }
            (job, out, written)
        }
    };
    let job_id = job.job_id.clone();
    let hint = Hint { args, job_id: &job_id };

    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| Failure::Service(format!("cannot listen for Ctrl-C: {e}")))?;
    let mut display = Display::new(&job);
    out.share_terminal(&display);
    let mut last = job;
    let mut retries = 0;
    'watch: loop {
        let stream = tokio::select! {
            stream = client.watch_bulk_check(&job_id, written) => stream,
            _ = interrupt.recv() => return Ok(interrupted(&display, &mut out, &hint, written)),
        };
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) if retryable(&e) && retries < MAX_RETRIES => {
                retries += 1;
                display.note(&format!("cannot watch job {job_id} ({e}); trying again"));
                tokio::time::sleep(backoff(retries)).await;
                continue 'watch;
            }
            Err(e) => return Err(lost(&display, &mut out, &hint, written, e)),
        };
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                _ = interrupt.recv() => return Ok(interrupted(&display, &mut out, &hint, written)),
            };
            use pb::watch_bulk_check_response::Event;
            match item {
                None => break 'watch,
                Some(Ok(pb::WatchBulkCheckResponse {
                    event: Some(Event::Result(result)),
                })) => {
                    retries = 0;
                    // Each offset once: a repeat (none is expected) is not written twice.
                    if result.offset <= written {
                        continue;
                    }
                    let Some(row) = input.rows.get(result.index as usize) else {
                        display.note(&format!(
                            "result {} names recipient {} of {}; skipped",
                            result.offset,
                            result.index,
                            input.rows.len()
                        ));
                        written = result.offset;
                        continue;
                    };
                    let answer = result.answer.unwrap_or_default();
                    if let Err(e) = out.write(row, &answer) {
                        let e = BulkError {
                            code: tonic::Code::Unknown,
                            message: format!("cannot write to {}: {e}", out.name),
                        };
                        return Err(lost(&display, &mut out, &hint, written, e));
                    }
                    written = result.offset;
                }
                Some(Ok(pb::WatchBulkCheckResponse {
                    event: Some(Event::Progress(progress)),
                })) => {
                    // What is written is kept: a crash from here on loses nothing a resume cannot count.
                    if let Err(e) = out.flush() {
                        let e = BulkError {
                            code: tonic::Code::Unknown,
                            message: format!("cannot write to {}: {e}", out.name),
                        };
                        return Err(lost(&display, &mut out, &hint, written, e));
                    }
                    display.update(&progress);
                    last = progress;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) if retryable(&e) && retries < MAX_RETRIES => {
                    retries += 1;
                    display.note(&format!(
                        "the watch of job {job_id} broke ({e}); resuming after result {written}"
                    ));
                    tokio::time::sleep(backoff(retries)).await;
                    continue 'watch;
                }
                Some(Err(e)) => return Err(lost(&display, &mut out, &hint, written, e)),
            }
        }
    }
    if let Err(e) = out.flush() {
        let e = BulkError {
            code: tonic::Code::Unknown,
            message: format!("cannot write to {}: {e}", out.name),
        };
        return Err(lost(&display, &mut out, &hint, written, e));
    }
    display.finish();
    let summary = format!(
        "job {job_id} {}: {} recipients, {} from cache, {} reachable; {} skipped; {written} results in {}",
        state_name(&last),
        last.total,
        last.from_cache,
        last.reachable,
        bad_rows(input.bad),
        out.name
    );
    eprintln!("bulk-check: {summary}");
    Ok(match last.state() {
        pb::BulkCheckState::Succeeded => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

fn bad_rows(count: u64) -> String {
    match count {
        1 => "1 bad row".into(),
        n => format!("{n} bad rows"),
    }
}

fn state_name(job: &pb::BulkCheck) -> &'static str {
    job.state().as_str_name().trim_start_matches("BULK_CHECK_STATE_")
}

/// A watch cut by a shutdown or a network hiccup: resumed on any replica with after_offset.
fn retryable(e: &BulkError) -> bool {
    matches!(
        e.code,
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
    )
}

fn backoff(retries: u32) -> Duration {
    Duration::from_millis(500 << retries.min(4))
}

/// Ctrl-C: what is written stays, the job goes on, and the way back is printed.
fn interrupted(display: &Display, out: &mut Output, hint: &Hint, written: u64) -> ExitCode {
    let flushed = out.flush();
    display.abandon();
    if let Err(e) = flushed {
        eprintln!("bulk-check: cannot write to {}: {e}", out.name);
    }
    eprintln!(
        "bulk-check: interrupted; job {} goes on in the service ({written} results written to {}).",
        hint.job_id, out.name
    );
    hint.print(out.path.is_some());
    ExitCode::from(INTERRUPTED)
}

/// The job could not be followed to its end: it goes on without us; say how to come back.
fn lost(display: &Display, out: &mut Output, hint: &Hint, written: u64, e: BulkError) -> Failure {
    let _ = out.flush();
    display.abandon();
    eprintln!(
        "bulk-check: job {} goes on in the service ({written} results written to {}).",
        hint.job_id, out.name
    );
    hint.print(out.path.is_some());
    Failure::Service(e.message)
}

/// The commands that resume or cancel a job left running.
struct Hint<'a> {
    args: &'a BulkCheckArgs,
    job_id: &'a str,
}

impl Hint<'_> {
    fn print(&self, to_file: bool) {
        let args = self.args;
        let mut common = vec!["capability-facade".to_owned(), "bulk-check".to_owned()];
        if args.connect.addr != DEFAULT_ADDR {
            common.extend(["--addr".to_owned(), quote(&args.connect.addr)]);
        }
        let mut resume = common.clone();
        resume.extend(["--app-id".to_owned(), quote(&args.app_id)]);
        if let Some(input) = &args.input {
            resume.extend(["--in".to_owned(), quote(&input.display().to_string())]);
        }
        if let Some(output) = &args.output {
            resume.extend(["--out".to_owned(), quote(&output.display().to_string())]);
        }
        // The options the job's request_id was derived from, which a resume checks.
        let duration = |d: Duration| quote(&humantime::format_duration(d).to_string());
        if args.refresh {
            resume.push("--refresh".to_owned());
        } else if let Some(max_age) = args.max_age {
            resume.extend(["--max-age".to_owned(), duration(max_age)]);
        }
        if let Some(wait) = args.wait {
            resume.extend(["--wait".to_owned(), duration(wait)]);
        }
        resume.extend(["--job".to_owned(), quote(self.job_id)]);
        let mut cancel = common;
        cancel.extend(["--job".to_owned(), quote(self.job_id), "--cancel".to_owned()]);
        let same = if args.connect.token.is_some() || args.connect.tls_ca.is_some() || args.connect.tls_cert.is_some() {
            " (with the same --token/--tls-… options)"
        } else {
            ""
        };
        let rest = if to_file {
            "appends only the results not yet written"
        } else {
            "writes every result again; give --out FILE to write only the rest"
        };
        eprintln!("  resume ({rest}):\n    {}{same}", resume.join(" "));
        eprintln!(
            "  cancel (its results so far are kept):\n    {}{same}",
            cancel.join(" ")
        );
    }
}

/// `text` as one shell word.
fn quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// How the request_id this command derives from the file and the options begins; 32 hex digits follow.
const DERIVED: &str = "bulk-";

/// Whether `request_id` is one this command derives ([`derived_request_id`]), not one a caller chose.
fn derived(request_id: &str) -> bool {
    request_id
        .strip_prefix(DERIVED)
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// The job's request: the good rows, the options, and a request_id that the same command gets again.
fn start_request(args: &BulkCheckArgs, bytes: &[u8], input: &Input) -> pb::StartBulkCheckRequest {
    pb::StartBulkCheckRequest {
        app_id: args.app_id.clone(),
        recipients: input.rows.iter().map(|row| row.recipient.clone()).collect(),
        max_age: max_age(args).map(prost_duration),
        channel_preference: Vec::new(),
        request_id: args
            .request_id
            .clone()
            .unwrap_or_else(|| derived_request_id(args, bytes)),
        wait: args.wait.map(prost_duration),
    }
}

/// The oldest cached result the job accepts: none with `--refresh`.
fn max_age(args: &BulkCheckArgs) -> Option<Duration> {
    if args.refresh {
        Some(Duration::ZERO)
    } else {
        args.max_age
    }
}

/// The request_id this command derives from the app, the options and the file's bytes.
fn derived_request_id(args: &BulkCheckArgs, bytes: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"capability-facade bulk-check 1\0");
    hash.update(args.app_id.as_bytes());
    hash.update(format!("\0{:?}\0{:?}\0", max_age(args), args.wait).as_bytes());
    hash.update(bytes);
    let digest = hash.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{DERIVED}{hex}")
}

/// A file's format, by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    JsonLines,
}

impl Format {
    fn of(path: &Path) -> Result<Format, String> {
        let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("csv") => Ok(Format::Csv),
            Some("jsonl" | "ndjson" | "json") => Ok(Format::JsonLines),
            _ => Err(format!(
                "{}: cannot tell the format from the name: use .csv, or .jsonl, .ndjson or .json for JSON lines",
                path.display()
            )),
        }
    }
}

/// One good record of the input.
#[derive(Debug)]
struct Row {
    /// Its position among the input's records (0-based; the header, blank lines and nothing else left out: bad
    /// rows count).
    index: u64,
    /// The file's line it starts on (1-based; a CSV's header is line 1).
    line: u64,
    recipient: pb::Recipient,
}

/// The good records of an input, and how many were bad.
#[derive(Debug, Default)]
struct Input {
    rows: Vec<Row>,
    bad: u64,
    /// CSV columns that name nothing this command reads.
    ignored_columns: Vec<String>,
}

impl Input {
    fn take(&mut self, index: u64, line: u64, recipient: Result<pb::Recipient, String>, report: Report) {
        match recipient.and_then(validate) {
            Ok(recipient) => self.rows.push(Row { index, line, recipient }),
            Err(reason) => {
                self.bad += 1;
                report(line, &reason);
            }
        }
    }
}

/// Told each bad row: its line and what is wrong.
type Report<'a> = &'a mut dyn FnMut(u64, &str);

/// The input's records; an error when the file cannot be read as `format` at all.
fn read_input(bytes: &[u8], format: Format, report: Report) -> Result<Input, String> {
    match format {
        Format::Csv => read_csv(bytes, report),
        Format::JsonLines => read_json_lines(bytes, report),
    }
}

/// What each column of a CSV holds.
#[derive(Debug, Default)]
struct Columns {
    contact_id: Option<usize>,
    channel: Option<usize>,
    identity: Option<usize>,
    /// (column, channel) for each column named after a channel.
    channels: Vec<(usize, String)>,
    ignored: Vec<String>,
}

impl Columns {
    fn of(header: &csv::StringRecord) -> Result<Columns, String> {
        let mut columns = Columns::default();
        let mut seen = HashSet::new();
        for (at, name) in header.iter().enumerate() {
            let lower = name.trim().to_ascii_lowercase();
            let slot = match lower.as_str() {
                "contact_id" => &mut columns.contact_id,
                "channel" => &mut columns.channel,
                "identity" => &mut columns.identity,
                _ => match known_channel(name) {
                    Some(channel) => {
                        if !seen.insert(channel.clone()) {
                            return Err(format!("the header (line 1) names the channel {channel} twice"));
                        }
                        columns.channels.push((at, channel));
                        continue;
                    }
                    None => {
                        columns.ignored.push(name.trim().to_owned());
                        continue;
                    }
                },
            };
            if slot.replace(at).is_some() {
                return Err(format!("the header (line 1) names {lower} twice"));
            }
        }
        if columns.channel.is_some() != columns.identity.is_some() {
            return Err("the header (line 1) names one of channel and identity without the other".into());
        }
        if columns.contact_id.is_none() && columns.channel.is_none() && columns.channels.is_empty() {
            return Err(
                "the header (line 1) must name contact_id, or channel and identity, or channel columns such as \
                 WHATSAPP,RCS,SMS"
                    .into(),
            );
        }
        Ok(columns)
    }

    /// The recipient of one record.
    fn recipient(&self, record: &csv::StringRecord) -> Result<pb::Recipient, String> {
        let cell = |at: Option<usize>| at.and_then(|at| record.get(at)).unwrap_or_default();
        let contact_id = cell(self.contact_id);
        let mut identities = Vec::new();
        match (cell(self.channel), cell(self.identity)) {
            ("", "") => {}
            (channel, "") => return Err(format!("channel {channel:?} without an identity")),
            ("", _) => return Err("an identity without a channel".into()),
            (channel, identity) => identities.push(channel_identity(channel, identity.to_owned())),
        }
        for (at, channel) in &self.channels {
            let identity = cell(Some(*at));
            if !identity.is_empty() {
                identities.push(channel_identity(channel, identity.to_owned()));
            }
        }
        recipient(contact_id, identities)
    }
}

fn read_csv(bytes: &[u8], report: Report) -> Result<Input, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let mut records = reader.records();
    let header = match records.next() {
        None => return Err("empty: the first line must be a header".into()),
        Some(Err(e)) => return Err(format!("the header (line 1) cannot be read: {e}")),
        Some(Ok(header)) => header,
    };
    let columns = Columns::of(&header)?;
    let mut input = Input {
        ignored_columns: columns.ignored.clone(),
        ..Input::default()
    };
    let mut lines = LineCounter::new(bytes);
    for (index, record) in records.enumerate() {
        let index = index as u64;
        match record {
            Ok(record) => {
                let line = lines.line_of(record.position());
                let recipient = if record.len() != header.len() {
                    Err(format!("{} fields where the header has {}", record.len(), header.len()))
                } else {
                    columns.recipient(&record)
                };
                input.take(index, line, recipient, report);
            }
            Err(e) => {
                let line = lines.line_of(e.position());
                let reason = match e.kind() {
                    csv::ErrorKind::Utf8 { .. } => "not UTF-8".to_owned(),
                    csv::ErrorKind::Io(_) => return Err(e.to_string()),
                    _ => e.to_string(),
                };
                input.take(index, line, Err(reason), report);
            }
        }
    }
    Ok(input)
}

/// The line a CSV record starts on. The reader's own line is where it began reading: before the blank lines it
/// skipped.
struct LineCounter<'a> {
    bytes: &'a [u8],
    /// `line` is the line of byte `at`.
    at: usize,
    line: u64,
}

impl LineCounter<'_> {
    fn new(bytes: &[u8]) -> LineCounter<'_> {
        LineCounter { bytes, at: 0, line: 1 }
    }

    /// Records come in order: each call counts only the bytes since the last.
    fn line_of(&mut self, position: Option<&csv::Position>) -> u64 {
        let Some(position) = position else { return 0 };
        let mut start = (position.byte() as usize).min(self.bytes.len());
        while start < self.bytes.len() && matches!(self.bytes[start], b'\r' | b'\n') {
            start += 1;
        }
        if start >= self.at {
            // A line ends at LF, or at a CR not followed by one (as the reader takes it).
            let ends = (self.at..start).filter(|&i| match self.bytes[i] {
                b'\n' => true,
                b'\r' => self.bytes.get(i + 1) != Some(&b'\n'),
                _ => false,
            });
            self.line += ends.count() as u64;
            self.at = start;
        }
        self.line
    }
}

fn read_json_lines(bytes: &[u8], report: Report) -> Result<Input, String> {
    // A byte order mark (as Windows editors write UTF-8) is not part of the first line; CSV's reader skips it too.
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err("holds a JSON array: give one JSON object a line (JSON lines)".into());
    }
    let mut input = Input::default();
    let mut index = 0;
    for (at, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let number = at as u64 + 1;
        let text = match std::str::from_utf8(line) {
            Ok(text) => text.trim(),
            Err(_) => {
                input.take(index, number, Err("not UTF-8".into()), report);
                index += 1;
                continue;
            }
        };
        if text.is_empty() {
            continue;
        }
        input.take(index, number, json_recipient(text), report);
        index += 1;
    }
    Ok(input)
}

/// The recipient of one JSON line.
fn json_recipient(text: &str) -> Result<pb::Recipient, String> {
    use serde_json::Value;
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err("not a JSON object".into());
    };
    let contact_id = match object.get("contact_id") {
        None | Some(Value::Null) => "",
        Some(Value::String(id)) => id.as_str(),
        Some(_) => return Err("contact_id is not a string".into()),
    };
    let identity = |object: &serde_json::Map<String, Value>, path: &str| -> Result<pb::ChannelIdentity, String> {
        let channel = match object.get("channel") {
            Some(Value::String(channel)) => channel.as_str(),
            None | Some(Value::Null) => return Err(format!("{path}channel is missing")),
            Some(_) => return Err(format!("{path}channel is not a string")),
        };
        let identity = match object.get("identity") {
            Some(Value::String(identity)) => identity.trim().to_owned(),
            // A phone number written as a JSON number.
            Some(Value::Number(n)) if n.is_u64() => n.to_string(),
            None | Some(Value::Null) => return Err(format!("{path}identity is missing")),
            Some(_) => return Err(format!("{path}identity is not a string")),
        };
        Ok(channel_identity(channel, identity))
    };
    let mut identities = Vec::new();
    match object.get("identities") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (at, item) in items.iter().enumerate() {
                let Value::Object(item) = item else {
                    return Err(format!("identities[{at}] is not an object"));
                };
                identities.push(identity(item, &format!("identities[{at}]."))?);
            }
            if items.is_empty() {
                return Err("identities is empty".into());
            }
        }
        Some(_) => return Err("identities is not an array".into()),
    }
    if object.contains_key("channel") || object.contains_key("identity") {
        if !identities.is_empty() {
            return Err("both identities and channel/identity: give one".into());
        }
        identities.push(identity(&object, "")?);
    }
    recipient(contact_id, identities)
}

/// A recipient from a contact id or identities: exactly one of them.
fn recipient(contact_id: &str, identities: Vec<pb::ChannelIdentity>) -> Result<pb::Recipient, String> {
    let recipient = match (contact_id.trim(), identities.is_empty()) {
        ("", true) => return Err("no contact_id and no identity".into()),
        ("", false) => pb::recipient::Recipient::IdentifiedBy(pb::IdentifiedBy {
            channel_identities: identities,
        }),
        (id, true) => pb::recipient::Recipient::ContactId(id.to_owned()),
        (_, false) => return Err("both a contact_id and identities: give one".into()),
    };
    Ok(pb::Recipient {
        recipient: Some(recipient),
    })
}

/// The channel a CSV column is named after, when this contract knows it.
fn known_channel(name: &str) -> Option<String> {
    match channel_of(name) {
        Channel::Other(_) => None,
        channel => Some(channel.as_sinch().to_owned()),
    }
}

/// A channel as Sinch spells it, from `whatsapp`, `WHATSAPP` or `CHANNEL_WHATSAPP`.
fn channel_of(name: &str) -> Channel {
    let upper = name.trim().to_ascii_uppercase();
    match upper.strip_prefix("CHANNEL_").map(Channel::from_sinch) {
        Some(channel) if !matches!(channel, Channel::Other(_)) => channel,
        _ => Channel::from_sinch(&upper),
    }
}

fn channel_identity(channel: &str, identity: String) -> pb::ChannelIdentity {
    let channel = channel_of(channel);
    pb::ChannelIdentity {
        channel: channel.number(),
        identity,
        app_id: String::new(),
        channel_raw: match channel {
            Channel::Other(raw) => raw.into(),
            _ => String::new(),
        },
    }
}

/// `recipient` if the service would take it (its own checks), else what is wrong.
fn validate(recipient: pb::Recipient) -> Result<pb::Recipient, String> {
    let request = pb::QueryCapabilityRequest {
        app_id: "-".into(),
        recipient: Some(recipient),
        request_id: String::new(),
    };
    match convert::query_request(request.clone()) {
        Ok(_) => Ok(request.recipient.unwrap_or_default()),
        Err(violations) => Err(violations
            .iter()
            .map(|v| {
                let field = v
                    .field
                    .replacen("recipient.identified_by.channel_identities", "identities", 1)
                    .replacen("recipient.", "", 1);
                format!("{field}: {}", v.description)
            })
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

/// Where the results go.
struct Output {
    sink: Sink,
    /// The file, or `None` for stdout.
    path: Option<PathBuf>,
    /// How messages name it.
    name: String,
}

enum Sink {
    Csv(Box<csv::Writer<Box<dyn Write>>>),
    JsonLines(BufWriter<Box<dyn Write>>),
}

impl Output {
    /// Opens `path` (stdout when `None`): replaced, or with `resume` appended to after its complete rows. Returns
    /// how many results it holds.
    fn open(path: Option<&Path>, resume: bool) -> Result<(Output, u64), String> {
        let Some(path) = path else {
            let stdout: Box<dyn Write> = Box::new(io::stdout());
            let output = Output {
                sink: Sink::JsonLines(BufWriter::new(stdout)),
                path: None,
                name: "stdout".into(),
            };
            return Ok((output, 0));
        };
        let name = path.display().to_string();
        let format = Format::of(path)?;
        let cannot = |e: io::Error| format!("cannot write to {name}: {e}");
        let (file, lines): (File, u64) = if resume && path.exists() {
            let lines = complete_lines(path).map_err(cannot)?;
            let file = OpenOptions::new().append(true).open(path).map_err(cannot)?;
            (file, lines)
        } else {
            (File::create(path).map_err(cannot)?, 0)
        };
        let file: Box<dyn Write> = Box::new(file);
        let (sink, held) = match format {
            Format::JsonLines => (Sink::JsonLines(BufWriter::new(file)), lines),
            Format::Csv => {
                let mut writer = csv::WriterBuilder::new().has_headers(false).from_writer(file);
                if lines == 0 {
                    writer
                        .write_record(CSV_HEADER)
                        .map_err(|e| format!("cannot write to {name}: {e}"))?;
                } else if first_line(path).map_err(cannot)? != CSV_HEADER.join(",") {
                    return Err(format!(
                        "{name} does not start with the header {}: not an output of bulk-check",
                        CSV_HEADER.join(",")
                    ));
                }
                (Sink::Csv(Box::new(writer)), lines.saturating_sub(1))
            }
        };
        let output = Output {
            sink,
            path: Some(path.to_owned()),
            name,
        };
        Ok((output, held))
    }

    /// One recipient's row.
    fn write(&mut self, row: &Row, answer: &pb::CheckCapabilityResponse) -> io::Result<()> {
        self.sink.write(row, answer)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }

    /// Rows written to the terminal that shows `display`'s bar are written with the bar lifted, whole lines at a
    /// time (a buffer's worth), so that each starts a line of its own rather than after the bar, on its line.
    /// Called before any row.
    fn share_terminal(&mut self, display: &Display) {
        if let (None, true, Some(bar)) = (&self.path, io::stdout().is_terminal(), display.bar()) {
            let lifted: Box<dyn Write> = Box::new(Lifted {
                bar: bar.clone(),
                partial: Vec::new(),
            });
            self.sink = Sink::JsonLines(BufWriter::new(lifted));
        }
    }
}

/// Stdout below a progress bar on the same terminal: whole lines, however long, are written with the bar lifted
/// and drawn again below; the rest of a line waits for its end (or a flush).
struct Lifted {
    bar: ProgressBar,
    partial: Vec<u8>,
}

impl Lifted {
    /// Writes out the first `len` bytes held, the bar lifted.
    fn write_out(&mut self, len: usize) -> io::Result<()> {
        let lines = &self.partial[..len];
        self.bar.suspend(|| {
            let mut stdout = io::stdout().lock();
            stdout.write_all(lines)?;
            stdout.flush()
        })?;
        self.partial.drain(..len);
        Ok(())
    }
}

impl Write for Lifted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.partial.extend_from_slice(buf);
        if let Some(last) = self.partial.iter().rposition(|&b| b == b'\n') {
            self.write_out(last + 1)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.partial.len() {
            0 => Ok(()),
            len => self.write_out(len),
        }
    }
}

impl Sink {
    fn write(&mut self, row: &Row, answer: &pb::CheckCapabilityResponse) -> io::Result<()> {
        let ids = |ids: &[pb::ChannelIdentity]| -> Vec<String> { ids.iter().map(identity_text).collect() };
        let results = answer
            .results
            .iter()
            .filter_map(|r| Some((r.notification.as_ref()?, source_name(r))));
        match self {
            Sink::JsonLines(out) => {
                let results = results
                    .map(|(n, source)| JsonResult {
                        channel: channel_name(n.channel, &n.channel_raw),
                        identity: &n.identity,
                        status: &n.capability_status_raw,
                        source,
                        reason: n.reason.as_ref().map(|r| r.code.as_str()).unwrap_or_default(),
                        capabilities: &n.channel_capabilities,
                    })
                    .collect();
                let line = JsonRow {
                    index: row.index,
                    line: row.line,
                    complete: answer.complete,
                    recommended: ids(&answer.recommended),
                    results,
                    pending: ids(&answer.pending),
                    request_id: &answer.request_id,
                };
                serde_json::to_writer(&mut *out, &line)?;
                out.write_all(b"\n")
            }
            Sink::Csv(out) => {
                let results: Vec<String> = results
                    .map(|(n, source)| {
                        format!(
                            "{}:{}={}/{source}",
                            channel_name(n.channel, &n.channel_raw),
                            n.identity,
                            n.capability_status_raw
                        )
                    })
                    .collect();
                let record = [
                    row.index.to_string(),
                    row.line.to_string(),
                    answer.complete.to_string(),
                    ids(&answer.recommended).join(";"),
                    results.join(";"),
                    ids(&answer.pending).join(";"),
                ];
                // One line per row, always: a resume counts lines.
                out.write_record(record.iter().map(|field| one_line(field)))
                    .map_err(io::Error::other)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Csv(out) => out.flush(),
            Sink::JsonLines(out) => out.flush(),
        }
    }
}

/// A row of a JSON lines output, its fields in this order.
#[derive(serde::Serialize)]
struct JsonRow<'a> {
    index: u64,
    line: u64,
    complete: bool,
    recommended: Vec<String>,
    results: Vec<JsonResult<'a>>,
    pending: Vec<String>,
    request_id: &'a str,
}

#[derive(serde::Serialize)]
struct JsonResult<'a> {
    channel: String,
    identity: &'a str,
    status: &'a str,
    source: String,
    reason: &'a str,
    capabilities: &'a [String],
}

fn source_name(result: &pb::ChannelResult) -> String {
    result
        .source()
        .as_str_name()
        .trim_start_matches("RESULT_SOURCE_")
        .to_ascii_lowercase()
}

fn channel_name(number: i32, raw: &str) -> String {
    match (raw, Channel::from_number(number)) {
        ("", Some(channel)) => channel.as_sinch().to_owned(),
        (raw, _) => raw.to_owned(),
    }
}

fn identity_text(id: &pb::ChannelIdentity) -> String {
    format!("{}:{}", channel_name(id.channel, &id.channel_raw), id.identity)
}

fn one_line(text: &str) -> String {
    text.replace(|c: char| c.is_control(), " ")
}

/// How many complete lines `path` holds; a last line without its newline (a write cut short) is cut off.
fn complete_lines(path: &Path) -> io::Result<u64> {
    let bytes = fs::read(path)?;
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |at| at + 1);
    if complete < bytes.len() {
        OpenOptions::new().write(true).open(path)?.set_len(complete as u64)?;
    }
    Ok(bytes[..complete].iter().filter(|b| **b == b'\n').count() as u64)
}

fn first_line(path: &Path) -> io::Result<String> {
    let bytes = fs::read(path)?;
    let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    Ok(String::from_utf8_lossy(line).trim_end_matches('\r').to_owned())
}

/// The progress: a bar when stderr is a terminal, else a plain line at most every [`PLAIN_EVERY`].
enum Display {
    Bar(ProgressBar),
    Plain { job_id: String, next: Instant },
}

impl Display {
    fn new(job: &pb::BulkCheck) -> Display {
        if !io::stderr().is_terminal() {
            return Display::Plain {
                job_id: job.job_id.clone(),
                next: Instant::now(),
            };
        }
        let bar = ProgressBar::with_draw_target(Some(job.total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_position(job.done);
        bar.set_message(counts(job));
        Display::Bar(bar)
    }

    fn update(&mut self, job: &pb::BulkCheck) {
        match self {
            Display::Bar(bar) => {
                bar.set_position(job.done);
                bar.set_message(counts(job));
            }
            Display::Plain { job_id, next } => {
                let now = Instant::now();
                if now >= *next && job.state() == pb::BulkCheckState::Running {
                    *next = now + PLAIN_EVERY;
                    eprintln!("bulk-check {job_id}: {}/{} done, {}", job.done, job.total, counts(job));
                }
            }
        }
    }

    fn bar(&self) -> Option<&ProgressBar> {
        match self {
            Display::Bar(bar) => Some(bar),
            Display::Plain { .. } => None,
        }
    }

    /// A line that does not break the bar.
    fn note(&self, message: &str) {
        match self {
            Display::Bar(bar) => bar.println(format!("bulk-check: {message}")),
            Display::Plain { .. } => eprintln!("bulk-check: {message}"),
        }
    }

    /// The bar goes: the summary that follows says it all.
    fn finish(&self) {
        if let Display::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }

    fn abandon(&self) {
        if let Display::Bar(bar) = self {
            bar.abandon();
        }
    }
}

/// The counts and the time left, as the progress shows them.
fn counts(job: &pb::BulkCheck) -> String {
    let left = match job.estimated_remaining.and_then(|d| Duration::try_from(d).ok()) {
        Some(left) => humantime::format_duration(Duration::from_secs(left.as_secs())).to_string(),
        None if job.state() == pb::BulkCheckState::Running => "?".into(),
        None => state_name(job).to_ascii_lowercase(),
    };
    format!("{} from cache, {} reachable, ETA {left}", job.from_cache, job.reachable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, format: Format) -> (Input, Vec<(u64, String)>) {
        let mut bad = Vec::new();
        let input = read_input(text.as_bytes(), format, &mut |line, reason| {
            bad.push((line, reason.to_owned()))
        })
        .expect("readable");
        (input, bad)
    }

    fn identities(row: &Row) -> Vec<String> {
        match row.recipient.recipient.as_ref().unwrap() {
            pb::recipient::Recipient::IdentifiedBy(by) => by.channel_identities.iter().map(identity_text).collect(),
            pb::recipient::Recipient::ContactId(id) => vec![format!("contact:{id}")],
        }
    }

    #[test]
    fn csv_layouts_and_bad_rows_by_line() {
        let (input, bad) = read(
            "name,WhatsApp,RCS,sms\nann,4671,4671,\n\nbob,,,\ncid,4672,\"46\n73\",\n",
            Format::Csv,
        );
        assert_eq!(input.ignored_columns, ["name"]);
        assert_eq!(input.rows.len(), 1);
        assert_eq!(identities(&input.rows[0]), ["WHATSAPP:4671", "RCS:4671"]);
        assert_eq!((input.rows[0].index, input.rows[0].line), (0, 2));
        assert_eq!(bad.iter().map(|(line, _)| *line).collect::<Vec<_>>(), [4, 5], "{bad:?}");
        assert!(bad[1].1.contains("control"), "{bad:?}");

        let (input, bad) = read(
            "contact_id,channel,identity\nc-1,,\n,sms,4670\nc-2,SMS,1\n,SMS,\n",
            Format::Csv,
        );
        assert_eq!(
            input.rows.iter().map(identities).collect::<Vec<_>>(),
            [["contact:c-1"], ["SMS:4670"]]
        );
        assert_eq!(bad.iter().map(|(line, _)| *line).collect::<Vec<_>>(), [4, 5]);
        assert!(read_input(b"who,what\n1,2\n", Format::Csv, &mut |_, _| {}).is_err());
    }

    /// Lines ended as old Mac editors end them (CR alone) or as Windows ones do (CR LF) are numbered as lines: with
    /// CR alone every row was said to be on line 1.
    #[test]
    fn csv_lines_are_numbered_whatever_ends_them() {
        let text = "name,WhatsApp,RCS,sms\nann,4671,4671,\n\nbob,,,\ncid,4672,\"46\n73\",\n";
        for end in ["\r", "\r\n"] {
            let (input, bad) = read(&text.replace('\n', end), Format::Csv);
            assert_eq!((input.rows[0].index, input.rows[0].line), (0, 2), "{end:?}");
            assert_eq!(
                bad.iter().map(|(line, _)| *line).collect::<Vec<_>>(),
                [4, 5],
                "{end:?}: {bad:?}"
            );
        }
    }

    #[test]
    fn json_lines_forms() {
        let (input, bad) = read(
            concat!(
                r#"{"contact_id": "c-1"}"#,
                "\n\n",
                r#"{"identities": [{"channel": "CHANNEL_RCS", "identity": "4671"}, {"channel": "sms", "identity": 4672}]}"#,
                "\n",
                r#"{"channel": "FUTURE_CHAT", "identity": "x"}"#,
                "\n[1]\n",
                r#"{"channel": "sms"}"#,
                "\n",
                r#"{"channel": "not a channel", "identity": "1"}"#,
                "\n",
            ),
            Format::JsonLines,
        );
        assert_eq!(
            input.rows.iter().map(identities).collect::<Vec<_>>(),
            [vec!["contact:c-1"], vec!["RCS:4671", "SMS:4672"], vec!["FUTURE_CHAT:x"]]
        );
        assert_eq!(
            input.rows.iter().map(|r| (r.index, r.line)).collect::<Vec<_>>(),
            [(0, 1), (1, 3), (2, 4)]
        );
        assert_eq!(
            bad.iter().map(|(line, _)| *line).collect::<Vec<_>>(),
            [5, 6, 7],
            "{bad:?}"
        );
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_line() {
        for format in [Format::JsonLines, Format::Csv] {
            let text = match format {
                Format::JsonLines => "\u{feff}{\"contact_id\": \"c-1\"}\n",
                _ => "\u{feff}contact_id\nc-1\n",
            };
            let (input, bad) = read(text, format);
            assert_eq!(input.rows.iter().map(identities).collect::<Vec<_>>(), [["contact:c-1"]]);
            assert!(bad.is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn formats_by_extension() {
        assert_eq!(Format::of(Path::new("a.CSV")), Ok(Format::Csv));
        for name in ["a.jsonl", "a.ndjson", "a.json"] {
            assert_eq!(Format::of(Path::new(name)), Ok(Format::JsonLines));
        }
        assert!(Format::of(Path::new("a.txt")).is_err());
        assert_eq!(quote("/tmp/a b.csv"), "'/tmp/a b.csv'");
    }
}

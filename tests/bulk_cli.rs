//! `capability-facade bulk-check` as a person runs it: the real binary as the client, against the real binary
//! serving in sandbox mode (whose answers follow each identity's last digit, see the README), with the callback
//! budget raised so that a job takes a second or two.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use serde_json::Value;

/// The service in sandbox mode, its bulk pace raised (or set to `rate` identities a second).
async fn service(rate: u32) -> common::Binary {
    common::Binary::spawn(&[
        ("SINCH_CALLBACK_RATE", rate.to_string()),
        ("CAPABILITY_SANDBOX_WEBHOOK_RATE", rate.to_string()),
        ("CAPABILITY_SANDBOX_CALLBACK_DELAY", "20ms".into()),
    ])
    .await
}

/// A fresh folder for one test's files.
fn folder(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bulk_cli").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The client command, with nothing from this process's environment but PATH.
fn client(service: &common::Binary, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_capability-facade"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("bulk-check")
        .args(["--addr", &service.url()])
        .args(args)
        .kill_on_drop(true);
    command
}

async fn bulk_check(service: &common::Binary, args: &[&str]) -> Output {
    let run = client(service, args).output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("bulk-check ends within a minute")
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The job id stderr names (`bulk-check: job ID (request_id …)` or `resuming job ID …`).
fn job_id(stderr: &str) -> String {
    stderr
        .split_whitespace()
        .skip_while(|word| *word != "job")
        .nth(1)
        .unwrap_or_else(|| panic!("no job id in {stderr}"))
        .to_owned()
}

/// A CSV output's rows (header left out), each as its fields.
fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("index,line,complete,recommended,results,pending"));
    lines.map(|line| line.split(',').map(str::to_owned).collect()).collect()
}

#[tokio::test]
async fn a_csv_with_bad_rows_checks_every_good_one_and_names_the_bad_lines() {
    let service = service(500).await;
    let dir = folder("bad_rows");
    let input = dir.join("contacts.csv");
    std::fs::write(
        &input,
        "name,WHATSAPP,RCS,SMS\n\
         ann,46700000001,46700000001,\n\
         bob,,,46700000006\n\
         nobody,,,\n\
         too,many,fields,here,!\n\
         carl,46700000004,,46700000002\n",
    )
    .unwrap();
    let out = dir.join("results.csv");
    let output = bulk_check(
        &service,
        &["--in", input.to_str().unwrap(), "--out", out.to_str().unwrap()],
    )
    .await;
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "exit 0 despite the bad rows: {stderr}");
    assert!(
        stderr.contains("contacts.csv line 4: no contact_id and no identity"),
        "{stderr}"
    );
    assert!(
        stderr.contains("contacts.csv line 5: 5 fields where the header has 4"),
        "{stderr}"
    );
    assert!(stderr.contains("ignoring the column(s) name"), "{stderr}");
    assert!(stderr.contains("SUCCEEDED: 3 recipients"), "{stderr}");

    let mut rows = csv_rows(&out);
    assert_eq!(rows.len(), 3, "one row per good recipient: {rows:?}");
    rows.sort_by_key(|row| row[1].parse::<u64>().unwrap());
    let expected = [
        // index, line, complete, recommended, results, pending
        [
            "0",
            "2",
            "true",
            "RCS:46700000001;WHATSAPP:46700000001",
            "WHATSAPP:46700000001=CAPABILITY_FULL/live;RCS:46700000001=CAPABILITY_FULL/live",
            "",
        ],
        ["1", "3", "true", "", "SMS:46700000006=NO_CAPABILITY/live", ""],
        [
            "4",
            "6",
            "true",
            "SMS:46700000002;WHATSAPP:46700000004",
            "WHATSAPP:46700000004=CAPABILITY_PARTIAL/live;SMS:46700000002=CAPABILITY_FULL/live",
            "",
        ],
    ];
    assert_eq!(rows, expected, "every FULL before every PARTIAL in the recommendation");
}

#[tokio::test]
async fn json_lines_in_every_form_give_json_lines_on_stdout() {
    let service = service(500).await;
    let dir = folder("json_lines");
    let input = dir.join("recipients.jsonl");
    std::fs::write(
        &input,
        concat!(
            r#"{"contact_id": "demo-bob"}"#,
            "\n",
            r#"{"identities": [{"channel": "RCS", "identity": "46700000003"}, {"channel": "whatsapp", "identity": 46700000008}]}"#,
            "\n",
            "\n",
            "{not json}\n",
            r#"{"channel": "SMS", "identity": "46700000005", "customer": 17}"#,
            "\n",
            r#"{"contact_id": "demo-bob", "channel": "SMS", "identity": "46700000005"}"#,
            "\n",
        ),
    )
    .unwrap();
    let output = bulk_check(&service, &["--in", input.to_str().unwrap(), "--wait", "5s"]).await;
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("recipients.jsonl line 4: not JSON"), "{stderr}");
    assert!(
        stderr.contains("recipients.jsonl line 6: both a contact_id and identities"),
        "{stderr}"
    );

    let mut rows: Vec<Value> = text(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    rows.sort_by_key(|row| row["line"].as_u64().unwrap());
    let summary: Vec<(u64, u64, Value)> = rows
        .iter()
        .map(|row| {
            (
                row["index"].as_u64().unwrap(),
                row["line"].as_u64().unwrap(),
                row["recommended"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (0, 1, serde_json::json!(["SMS:46700000002"])),
            (1, 2, serde_json::json!(["RCS:46700000003"])),
            (3, 5, serde_json::json!(["SMS:46700000005"])),
        ],
        "blank lines are not records; bad ones are: {rows:?}"
    );
    // demo-bob: WhatsApp not reachable, SMS full.
    let bob = rows[0]["results"].as_array().unwrap();
    assert_eq!(bob.len(), 2, "{bob:?}");
    assert!(bob.iter().any(|r| r["channel"] == "WHATSAPP"
        && r["status"] == "NO_CAPABILITY"
        && r["reason"] == "RECIPIENT_NOT_REACHABLE"));
    let second = &rows[1];
    assert_eq!(second["complete"], true);
    assert_eq!(second["pending"], serde_json::json!([]));
    assert_eq!(
        second["results"][1],
        serde_json::json!({"channel": "WHATSAPP", "identity": "46700000008", "status": "NO_CAPABILITY",
            "source": "live", "reason": "RECIPIENT_NOT_OPTED_IN", "capabilities": []})
    );
    assert_eq!(
        rows[2]["results"][0]["capabilities"],
        serde_json::json!(["TEXT", "MEDIA"])
    );
}

#[tokio::test]
async fn a_resume_with_job_appends_only_the_missing_rows_and_the_same_command_finds_the_same_job() {
    let service = service(500).await;
    let dir = folder("resume");
    let input = dir.join("numbers.csv");
    let numbers: String = (0..20).map(|i| format!("SMS,467100000{i:02}\n")).collect();
    std::fs::write(&input, format!("channel,identity\n{numbers}")).unwrap();
    let out = dir.join("results.csv");
    let args = ["--in", input.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let first = bulk_check(&service, &args).await;
    let stderr = text(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    let job = job_id(&stderr);
    let complete = std::fs::read_to_string(&out).unwrap();
    assert_eq!(complete.lines().count(), 1 + 20);

    // A crash after five rows, the sixth half written.
    let kept: Vec<&str> = complete.lines().take(1 + 5).collect();
    let sixth = complete.lines().nth(6).unwrap();
    std::fs::write(&out, format!("{}\n{}", kept.join("\n"), &sixth[..sixth.len() / 2])).unwrap();
    let resumed = bulk_check(&service, &[&args[..], &["--job", &job]].concat()).await;
    let stderr = text(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("resuming job {job} after the 5 results")),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        complete,
        "the missing rows, each once, in the job's order"
    );
    let mut indexes: Vec<u64> = csv_rows(&out).iter().map(|r| r[0].parse().unwrap()).collect();
    indexes.sort();
    assert_eq!(indexes, (0..20).collect::<Vec<_>>());

    // Nothing is missing: nothing is written.
    let again = bulk_check(&service, &[&args[..], &["--job", &job]].concat()).await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), complete);

    // The same command again (after a crash before the job id was noted): the same job, no second one.
    let rerun = bulk_check(&service, &args).await;
    let stderr = text(&rerun.stderr);
    assert!(rerun.status.success(), "{stderr}");
    assert_eq!(job_id(&stderr), job, "{stderr}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), complete);

    // Another file of as many rows (the same numbers, sorted otherwise) is not this job's: each result would be
    // written against another row's line.
    let reversed = dir.join("reversed.csv");
    let numbers: String = (0..20).rev().map(|i| format!("SMS,467100000{i:02}\n")).collect();
    std::fs::write(&reversed, format!("channel,identity\n{numbers}")).unwrap();
    std::fs::write(&out, kept.join("\n") + "\n").unwrap();
    let resume_from = async |input: &Path| {
        let args = [
            "--in",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--job",
            &job,
        ];
        bulk_check(&service, &args).await
    };
    let wrong = resume_from(&reversed).await;
    let stderr = text(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("started from another file"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        kept.join("\n") + "\n",
        "nothing written"
    );

    // Another input is not this job's.
    let other = dir.join("other.csv");
    std::fs::write(&other, "channel,identity\nSMS,46710000099\n").unwrap();
    let wrong = resume_from(&other).await;
    assert_eq!(wrong.status.code(), Some(2), "{}", text(&wrong.stderr));

    // A job whose request_id was chosen (one that looks like the command's own too) resumes: nothing tells the
    // file it was started from.
    let chosen = bulk_check(&service, &[&args[..], &["--request-id", "bulk-june"]].concat()).await;
    let stderr = text(&chosen.stderr);
    assert!(chosen.status.success(), "{stderr}");
    let resumed = bulk_check(&service, &[&args[..], &["--job", &job_id(&stderr)]].concat()).await;
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
}

/// An output that cannot be written (a folder that does not exist) is refused before the job starts: the job ran
/// to its end in the service, spending Sinch's budget, and the command, exiting 2, never named it.
#[tokio::test]
async fn an_output_that_cannot_be_written_starts_no_job() {
    use capability_facade::grpc::pb::{self, capability_service_client::CapabilityServiceClient};
    let service = service(500).await;
    let dir = folder("unwritable");
    let input = dir.join("numbers.csv");
    std::fs::write(&input, "channel,identity\nSMS,46710000001\nSMS,46710000002\n").unwrap();
    let nowhere = dir.join("missing").join("results.csv");
    let refused = bulk_check(
        &service,
        &["--in", input.to_str().unwrap(), "--out", nowhere.to_str().unwrap()],
    )
    .await;
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot write to"), "{stderr}");
    // In whole milliseconds, as the job's creation time is.
    let millis = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let between = millis(std::time::SystemTime::now());
    // The same command with an output that can be written finds the job the first started, if it started one.
    let out = dir.join("results.csv");
    let done = bulk_check(
        &service,
        &["--in", input.to_str().unwrap(), "--out", out.to_str().unwrap()],
    )
    .await;
    let stderr = text(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    let mut client = CapabilityServiceClient::connect(service.url()).await.unwrap();
    let request = pb::GetBulkCheckRequest {
        job_id: job_id(&stderr),
    };
    let job = client.get_bulk_check(request).await.unwrap().into_inner();
    let created = millis(std::time::SystemTime::try_from(job.create_time.unwrap()).unwrap());
    assert!(created >= between, "the job was started by the refused command");

    // A start the service refuses (this request_id names another file's job) leaves no output made for it.
    let named = ["--request-id", "named-once"];
    let first = bulk_check(&service, &[&["--in", input.to_str().unwrap()][..], &named].concat()).await;
    assert!(first.status.success(), "{}", text(&first.stderr));
    let other = dir.join("other.csv");
    std::fs::write(&other, "channel,identity\nSMS,46710000009\n").unwrap();
    let unmade = dir.join("unmade.csv");
    let args = ["--in", other.to_str().unwrap(), "--out", unmade.to_str().unwrap()];
    let refused = bulk_check(&service, &[&args[..], &named].concat()).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stderr));
    assert!(!unmade.exists(), "{}", text(&refused.stderr));
}

/// Results on stdout, with stdout and the progress bar on one terminal (the command as a person types it): each
/// row starts a line of its own. The bar was left on the line a row then began on, so rows came glued to it.
#[tokio::test]
async fn on_a_terminal_the_rows_on_stdout_never_share_a_line_with_the_bar() {
    let service = service(200).await;
    let dir = folder("terminal");
    // Ten identities a recipient: rows longer than a line buffer (1 KiB), which a first fix let out in pieces.
    let input = dir.join("numbers.jsonl");
    let rows: String = (0..40)
        .map(|i| {
            let ids: Vec<String> = (0..10)
                .map(|n| format!(r#"{{"channel": "SMS", "identity": "4671{i:02}0000{n:02}"}}"#))
                .collect();
            format!("{{\"identities\": [{}]}}\n", ids.join(", "))
        })
        .collect();
    std::fs::write(&input, rows).unwrap();
    // One shell word each.
    let word = |text: &str| format!("'{}'", text.replace('\'', r"'\''"));
    let command = format!(
        "{} bulk-check --addr {} --in {}",
        word(env!("CARGO_BIN_EXE_capability-facade")),
        word(&service.url()),
        word(&input.display().to_string())
    );
    // `script` runs the command on a pseudo-terminal, as its stdout and stderr both; a terminal that draws bars.
    let mut script = tokio::process::Command::new("script");
    script
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TERM", "xterm-256color")
        .args(["-qec", &command, "/dev/null"])
        .kill_on_drop(true);
    let run = tokio::time::timeout(Duration::from_secs(60), script.output());
    let output = run.await.expect("bulk-check ends within a minute").unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let mut screen = text(&output.stdout);
    // Escape sequences (the bar's clearing of its line) left out; what remains is split at line and carriage
    // returns, where the terminal starts a line again.
    while let Some(start) = screen.find('\x1b') {
        let end = screen[start + 1..]
            .find(|c: char| c.is_ascii_alphabetic() && c != '[')
            .map_or(screen.len(), |at| start + 1 + at + 1);
        screen.replace_range(start..end, "");
    }
    let rows: Vec<&str> = screen
        .split(['\r', '\n'])
        .filter(|l| l.contains("{\"index\""))
        .collect();
    assert_eq!(rows.len(), 40, "{screen}");
    assert!(screen.contains("/40 "), "the bar was drawn: {screen}");
    let glued: Vec<&&str> = rows.iter().filter(|l| !l.starts_with("{\"index\"")).collect();
    assert!(glued.is_empty(), "rows after the bar on its line: {glued:?}");
}

#[tokio::test]
async fn ctrl_c_leaves_the_job_running_and_prints_how_to_resume_or_cancel_it() {
    // 40 identities at 4 a second: about ten seconds of job, interrupted after the first.
    let service = service(4).await;
    let dir = folder("interrupt");
    let input = dir.join("numbers.jsonl");
    let lines: String = (0..40)
        .map(|i| format!("{{\"channel\": \"SMS\", \"identity\": \"467200000{i:02}\"}}\n"))
        .collect();
    std::fs::write(&input, lines).unwrap();
    let out = dir.join("results.ndjson");
    let args = [
        "--in",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--wait",
        "30s",
    ];
    let child = client(&service, &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupted once some results are in the file.
    tokio::time::timeout(Duration::from_secs(20), async {
        while std::fs::read_to_string(&out).map_or(0, |t| t.lines().count()) < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("results come");
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let output = child.wait_with_output().await.unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    let job = job_id(&stderr);
    let written = std::fs::read_to_string(&out).unwrap().lines().count();
    assert!(written < 40, "interrupted before the end: {stderr}");
    assert!(
        stderr.contains(&format!(
            "interrupted; job {job} goes on in the service ({written} results written"
        )),
        "{stderr}"
    );
    let addr = service.url();
    // With the options the job's request_id was derived from, which a resume checks.
    let resume = format!(
        "capability-facade bulk-check --addr {addr} --app-id sandbox-app --in {} --out {} --wait 30s --job {job}",
        args[1], args[3]
    );
    assert!(stderr.contains(&resume), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "capability-facade bulk-check --addr {addr} --job {job} --cancel"
        )),
        "{stderr}"
    );

    // The printed cancel command cancels the job while it still runs.
    let cancelled = client(&service, &["--job", &job, "--cancel"]).output().await.unwrap();
    let stdout = text(&cancelled.stdout);
    assert!(cancelled.status.success(), "{}", text(&cancelled.stderr));
    assert!(stdout.contains(&format!("job {job}: CANCELLED (")), "{stdout}");

    // The printed resume command writes the rest of what came, each once, and exits non-zero: cancelled.
    let resumed = bulk_check(&service, &[&args[..], &["--job", &job]].concat()).await;
    let stderr = text(&resumed.stderr);
    assert_eq!(resumed.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("CANCELLED"), "{stderr}");
    let rows: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let mut indexes: Vec<u64> = rows.iter().map(|row| row["index"].as_u64().unwrap()).collect();
    indexes.sort();
    indexes.dedup();
    assert_eq!(indexes.len(), rows.len(), "no row twice");
    assert!(rows.len() >= written && rows.len() < 40, "{} rows", rows.len());

    // The first command again finds the same job, ended: said, with how to check the file again. It gave the
    // cancelled job's results as if they were new.
    let again = bulk_check(&service, &args).await;
    let stderr = text(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{stderr}");
    assert_eq!(job_id(&stderr), job, "{stderr}");
    assert!(
        stderr.contains("had ended CANCELLED") && stderr.contains("--request-id"),
        "{stderr}"
    );
}

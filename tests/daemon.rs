//! The daemon as a user runs it: the real `cairn` binary on a temp data dir.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::fs::PermissionsExt,
};

use common::{EXIT_TIMEOUT, MachineLock, Serve, http_get, parse_metrics, run_cairn, temp_dir};

#[test]
fn serve_answers_healthz_version_metrics_and_json_404() {
    let cairn = Serve::new().start();

    let r = cairn.get("/healthz");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.content_type.starts_with("application/json"), "{r:?}");
    assert_eq!(r.json()["status"], "ok");

    let v = cairn.get("/version").json();
    assert_eq!(v["name"], "cairn");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["store_format_version"], cairn::store::FORMAT_VERSION);
    assert_eq!(v["catalog_schema_version"], cairn::catalog::SCHEMA_VERSION);
    assert!(
        v["git_commit"].is_null() || v["git_commit"].as_str().is_some_and(|s| !s.is_empty()),
        "{v}"
    );

    let r = cairn.get("/no/such/route");
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.content_type.starts_with("application/json"), "{r:?}");
    assert_eq!(r.json()["error"]["code"], 404);

    let r = cairn.get("/metrics");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.content_type.starts_with("application/openmetrics-text")
            || r.content_type.starts_with("text/plain; version=0.0.4"),
        "{r:?}"
    );
    let samples = parse_metrics(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body));
    let value = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.value)
            .unwrap_or_else(|| panic!("no {name} in\n{}", r.body))
    };
    for name in [
        "cairn_store_objects",
        "cairn_store_logical_bytes",
        "cairn_store_allocated_bytes",
        "cairn_store_physical_bytes",
        "cairn_store_segments",
        "cairn_store_checksum_errors_total",
        "cairn_store_healed_blocks_total",
        "cairn_store_read_retries_total",
        "cairn_store_reads_total",
        "cairn_store_writes_total",
        "cairn_store_read_bytes_total",
        "cairn_store_written_bytes_total",
        "cairn_store_flushes_total",
    ] {
        value(name);
    }
    assert_eq!(value("cairn_store_objects"), 0.0, "fresh store");
    assert!(
        value("cairn_store_free_bytes") > 0.0,
        "free space is reported"
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(
        value("cairn_runtime_workers"),
        cpus as f64,
        "one worker per CPU by default"
    );
    let http = |route: &str, status: &str| {
        samples.iter().any(|s| {
            s.name == "cairn_http_requests_total"
                && s.labels.get("route").map(String::as_str) == Some(route)
                && s.labels.get("status").map(String::as_str) == Some(status)
                && s.value >= 1.0
        })
    };
    assert!(http("/healthz", "200"), "{}", r.body);
    assert!(http("/version", "200"), "{}", r.body);
    assert!(http("<unmatched>", "404"), "{}", r.body);
}

#[test]
fn serve_creates_the_data_dir_private_with_store_catalog_and_mount_dir() {
    let cairn = Serve::new().start();
    let data = cairn.data_dir();
    let mode = std::fs::metadata(data)
        .expect("data dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "data dir mode {mode:o}");
    assert!(data.join("store").is_dir());
    assert!(data.join("catalog.sqlite").is_file());
    assert!(data.join("mnt").is_dir());
    assert!(
        cairn.logs.contains("NBD server"),
        "NBD config not reported:\n{}",
        cairn.logs.text()
    );
}

fn assert_clean_shutdown(sig: libc::c_int) {
    let mut cairn = Serve::new().start();
    let status = cairn.stop_with(sig);
    let logs = cairn.logs.text();
    assert_eq!(status.code(), Some(0), "exit {status}\n{logs}");
    let lines = cairn.logs.lines();
    let pos = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in logs\n{logs}"))
    };
    // In order: HTTP stops, the store closes, then the catalog, then the last word.
    assert!(
        pos("admin HTTP stopped") < pos("closing the store"),
        "{logs}"
    );
    assert!(
        pos("closing the store") < pos("closing the catalog"),
        "{logs}"
    );
    assert!(
        pos("closing the catalog") < pos("shutdown complete"),
        "{logs}"
    );
    assert!(!logs.contains("ERROR") && !logs.contains("WARN"), "{logs}");

    // Closed cleanly means the store checks clean and opens again.
    let dir = cairn.data_dir().to_str().expect("utf8 path").to_owned();
    let (status, out, err) = run_cairn(&["fsck", "--data-dir", &dir]);
    assert_eq!(status.code(), Some(0), "fsck after shutdown:\n{out}\n{err}");
    let mut again = Serve::new().data_dir(cairn.data_dir()).start();
    assert_eq!(again.get("/healthz").status, 200);
    assert_eq!(again.stop_with(libc::SIGTERM).code(), Some(0));
}

#[test]
fn sigterm_shuts_down_cleanly() {
    assert_clean_shutdown(libc::SIGTERM);
}

#[test]
fn sigint_shuts_down_cleanly() {
    assert_clean_shutdown(libc::SIGINT);
}

/// Reads one HTTP/1.1 response with a Content-Length body, leaving the connection open.
fn read_response(conn: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        conn.read_exact(&mut byte).expect("read head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).expect("read body");
    head + &String::from_utf8_lossy(&body)
}

/// A client holding an idle keep-alive connection must not hold up shutdown (the shutdown
/// timeout is set far beyond the test's patience, so waiting on it would fail the test).
#[test]
fn idle_keep_alive_connection_does_not_delay_shutdown() {
    let mut cairn = Serve::new().arg("--shutdown-timeout").arg("3600").start();
    let mut conn = TcpStream::connect(cairn.http()).expect("connect");
    conn.set_read_timeout(Some(EXIT_TIMEOUT)).expect("timeout");
    conn.write_all(b"GET /version HTTP/1.1\r\nHost: cairn\r\n\r\n")
        .expect("write");
    let answer = read_response(&mut conn);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("\"name\":\"cairn\""), "{answer:?}");

    let status = cairn.stop_with(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "{}", cairn.logs.text());
    assert!(cairn.logs.contains("shutdown complete"));
    assert!(
        !cairn.logs.contains("did not finish"),
        "{}",
        cairn.logs.text()
    );
    // The server closed its side.
    let mut rest = Vec::new();
    let n = conn.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "unexpected bytes after shutdown: {rest:?}");
}

#[test]
fn json_log_format_gives_one_json_object_per_line() {
    let mut cairn = Serve::new().arg("--log-format").arg("json").start();
    assert_eq!(cairn.stop_with(libc::SIGTERM).code(), Some(0));
    let lines = cairn.logs.lines();
    assert!(lines.len() >= 3, "{lines:?}");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string(), "{line}");
        assert!(v["message"].is_string(), "{line}");
    }
    let last: serde_json::Value =
        serde_json::from_str(lines.last().expect("a line")).expect("json");
    assert_eq!(last["message"], "shutdown complete");
}

#[test]
fn environment_variables_configure_the_daemon() {
    let tmp = temp_dir();
    let data = tmp.path().join("env-data");
    let mount = tmp.path().join("elsewhere/mnt");
    let addr = format!("127.0.0.1:{}", common::free_port());
    let mut cairn = Serve::new()
        .without_default_flags()
        .env("CAIRN_DATA_DIR", &data)
        .env("CAIRN_HTTP", &addr)
        .env("CAIRN_NBD", format!("127.0.0.1:{}", common::free_port()))
        .env("CAIRN_MOUNT_DIR", &mount)
        .env("CAIRN_LOG_FORMAT", "json")
        .env("CAIRN_WORKERS", "1")
        .current_dir(tmp.path())
        .keep(tmp)
        .start();
    assert_eq!(cairn.http().to_string(), addr, "CAIRN_HTTP not honoured");
    let metrics = cairn.get("/metrics").body;
    let workers = parse_metrics(&metrics)
        .expect("metrics")
        .into_iter()
        .find(|s| s.name == "cairn_runtime_workers")
        .map(|s| s.value);
    assert_eq!(workers, Some(1.0), "CAIRN_WORKERS not honoured\n{metrics}");
    assert_eq!(cairn.get("/healthz").status, 200);
    assert!(data.join("store").is_dir(), "CAIRN_DATA_DIR not honoured");
    assert!(mount.is_dir(), "CAIRN_MOUNT_DIR not honoured");
    for line in cairn.logs.lines() {
        assert!(
            line.starts_with('{'),
            "CAIRN_LOG_FORMAT not honoured: {line}"
        );
    }
    assert_eq!(cairn.stop_with(libc::SIGTERM).code(), Some(0));
}

/// `cairn serve` with nothing set: ./cairn-data in the working dir, HTTP on 127.0.0.1:8776.
#[test]
fn no_flags_runs_on_the_embedded_defaults() {
    // Test runs on this machine take turns on the fixed port.
    let _turn = MachineLock::acquire("default-port");
    if let Err(e) = std::net::TcpListener::bind("127.0.0.1:8776") {
        panic!("127.0.0.1:8776 is taken ({e}); stop whatever holds it and rerun");
    }
    let tmp = temp_dir();
    let cwd = tmp.path().to_path_buf();
    let mut cairn = Serve::new()
        .without_default_flags()
        .current_dir(&cwd)
        .keep(tmp)
        .start();
    assert_eq!(cairn.http().to_string(), "127.0.0.1:8776");
    assert!(cwd.join("cairn-data/store").is_dir());
    assert!(cwd.join("cairn-data/catalog.sqlite").is_file());
    assert!(cwd.join("cairn-data/mnt").is_dir());
    assert!(
        cairn.logs.contains("127.0.0.1:10809"),
        "{}",
        cairn.logs.text()
    );
    assert!(
        cairn
            .logs
            .contains(&format!("{}", cwd.join("cairn-data/nbd.sock").display())),
        "{}",
        cairn.logs.text()
    );
    assert_eq!(cairn.stop_with(libc::SIGTERM).code(), Some(0));
}

#[test]
fn fsck_reports_clean_on_a_fresh_store_and_fails_without_one() {
    let mut cairn = Serve::new().start();
    assert_eq!(cairn.stop_with(libc::SIGTERM).code(), Some(0));
    let dir = cairn.data_dir().to_str().expect("utf8").to_owned();

    let (status, out, err) = run_cairn(&["fsck", "--data-dir", &dir]);
    assert_eq!(status.code(), Some(0), "{out}\n{err}");
    assert!(out.contains("clean"), "{out}");

    let (status, out, err) = run_cairn(&["fsck", "--data-dir", &dir, "--json"]);
    assert_eq!(status.code(), Some(0), "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("fsck --json is JSON");
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");

    let empty = temp_dir();
    let (status, _, err) = run_cairn(&["fsck", "--data-dir", &empty.path().to_string_lossy()]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("no store"), "{err}");
}

#[test]
fn startup_errors_exit_nonzero_with_a_clear_message() {
    // The admin port is taken.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr").to_string();
    let tmp = temp_dir();
    let out = common::cairn_cmd()
        .args(["serve", "--http", &taken, "--data-dir"])
        .arg(tmp.path().join("d"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("binding the admin HTTP address"), "{err}");

    // The data dir is a file.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let out = common::cairn_cmd()
        .args(["serve", "--http", "127.0.0.1:0", "--data-dir"])
        .arg(&file)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a directory"), "{err}");

    // A bad flag value is a usage error.
    let (status, _, err) = run_cairn(&["serve", "--http", "nowhere"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--http"), "{err}");
    let (status, _, err) = run_cairn(&["serve", "--workers", "0"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--workers"), "{err}");
}

#[test]
fn help_explains_every_option_with_env_and_default() {
    let (status, top, _) = run_cairn(&["--help"]);
    assert!(status.success());
    let (status, serve, _) = run_cairn(&["serve", "--help"]);
    assert!(status.success());
    for help in [&top, &serve] {
        for needle in [
            "--data-dir",
            "CAIRN_DATA_DIR",
            "./cairn-data",
            "--http",
            "CAIRN_HTTP",
            "127.0.0.1:8776",
            "CAIRN_NBD",
            "127.0.0.1:10809",
            "CAIRN_NBD_SOCKET",
            "<data-dir>/nbd.sock",
            "CAIRN_MOUNT_DIR",
            "<data-dir>/mnt",
            "CAIRN_LOG_FORMAT",
            "CAIRN_LOG_LEVEL",
            "CAIRN_DIRECT_IO",
            "CAIRN_WORKERS",
        ] {
            assert!(help.contains(needle), "{needle:?} missing from\n{help}");
        }
    }
    let (status, out, _) = run_cairn(&["version"]);
    assert!(status.success());
    assert!(
        out.starts_with(&format!("cairn {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
}

/// Two daemons on one data dir: the second must refuse (the store lock) and leave the first
/// serving; fsck refuses a store in use too.
#[test]
fn second_serve_on_the_same_data_dir_fails_clearly() {
    let mut first = Serve::new().start();
    let data = first.data_dir().to_path_buf();
    let out = common::cairn_cmd()
        .args(["serve", "--http", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .expect("run second");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second serve succeeded:\n{err}");
    assert!(
        err.contains("in use") || err.contains("locked"),
        "no clear message:\n{err}"
    );
    let (status, _, err) = run_cairn(&["fsck", "--data-dir", &data.to_string_lossy()]);
    assert_eq!(status.code(), Some(2), "fsck on a store in use:\n{err}");
    // The first one is unharmed.
    let r = http_get(&first.url("/healthz")).expect("first still answers");
    assert_eq!(r.status, 200);
    assert_eq!(first.stop_with(libc::SIGTERM).code(), Some(0));
}

/// The exposition check above is only as good as the parser: it must reject broken text.
#[test]
fn metrics_parser_rejects_malformed_exposition() {
    let good = "# TYPE a counter\na_total{x=\"1\"} 3\n# TYPE b gauge\nb 2.5\n# EOF\n";
    let samples = parse_metrics(good).expect("valid exposition");
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[0].labels.get("x").map(String::as_str), Some("1"));
    for bad in [
        "b 1\n",                         // no TYPE
        "# TYPE b gauge\nb one\n",       // not a number
        "# TYPE b gauge\nb{x=1} 1\n",    // unquoted label
        "# TYPE b gauge\nb{x=\"1\" 1\n", // unterminated labels
        "# TYPE 9b gauge\n",             // bad name
        "# TYPE b gauge\n# EOF\nb 1\n",  // after EOF
        "# TYPE b colour\n",             // unknown type
        "# TYPE b gauge\nb 1 2 3\n",     // trailing junk
    ] {
        assert!(parse_metrics(bad).is_err(), "accepted {bad:?}");
    }
}

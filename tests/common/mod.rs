//! Helpers shared by the integration tests: run the real `cairn` binary on a temp data dir,
//! wait until it is ready, talk HTTP to it, signal it, read its logs.
//!
//! Readiness is observed, never assumed: the harness waits for the "admin HTTP listening" log
//! line (which carries the bound address, so `--http 127.0.0.1:0` needs no port guessing), then
//! polls `/healthz` in a bounded loop. Every wait has a deadline and fails with the daemon's
//! logs attached.

#![allow(dead_code)] // each test crate uses a different subset

use std::{
    collections::{BTreeMap, HashSet},
    ffi::OsString,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

/// Upper bound for the daemon to become ready (generous: debug builds on a busy 2-core box).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for a clean shutdown after a signal.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// The log line that announces the admin HTTP address.
pub const LISTENING: &str = "admin HTTP listening";

pub fn cairn_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cairn")
}

/// A `cairn` command with a clean environment: no `CAIRN_*`, `OS_*` or `RUST_LOG` leaks in from the
/// developer's shell, stdin is closed.
pub fn cairn_cmd() -> Command {
    scrubbed(Command::new(cairn_bin()))
}

/// `cmd` with the environment [`cairn_cmd`] cleans, and stdin closed.
fn scrubbed(mut cmd: Command) -> Command {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CAIRN_") || k.starts_with("OS_") || k == "RUST_LOG" {
            cmd.env_remove(&key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A port that was free a moment ago. Prefer `--http 127.0.0.1:0` plus [`Cairn::http`]; use
/// this only where the address must be known before start (e.g. to test `CAIRN_HTTP`).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("cairn-test-")
        .tempdir()
        .expect("create temp dir")
}

/// Lines a child wrote to stderr, collected by a reader thread.
#[derive(Clone, Default)]
pub struct Logs(Arc<(Mutex<LogState>, Condvar)>);

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    eof: bool,
}

impl Logs {
    fn collect(stream: impl std::io::Read + Send + 'static) -> Logs {
        let logs = Logs::default();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let (m, cv) = &*sink.0;
                m.lock().expect("log lock").lines.push(line);
                cv.notify_all();
            }
            let (m, cv) = &*sink.0;
            m.lock().expect("log lock").eof = true;
            cv.notify_all();
        });
        logs
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.0.lock().expect("log lock").lines.clone()
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }

    /// Waits until a line satisfies `pred` (returns it), the stream ends, or `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut st = m.lock().expect("log lock");
        let mut seen = 0;
        loop {
            if let Some(l) = st.lines[seen..].iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            seen = st.lines.len();
            let now = Instant::now();
            if st.eof || now >= deadline {
                return None;
            }
            st = cv.wait_timeout(st, deadline - now).expect("log lock").0;
        }
    }

    /// Waits for the end of the stream (the process exited and closed stderr).
    pub fn wait_eof(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut st = m.lock().expect("log lock");
        while !st.eof {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = cv.wait_timeout(st, deadline - now).expect("log lock").0;
        }
        true
    }
}

/// The address in an "admin HTTP listening" line, text (`addr=1.2.3.4:5`) or JSON.
pub fn parse_listening_addr(line: &str) -> Option<SocketAddr> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        return v.get("addr")?.as_str()?.parse().ok();
    }
    let rest = &line[line.find("addr=")? + "addr=".len()..];
    rest.split_whitespace()
        .next()?
        .trim_matches('"')
        .parse()
        .ok()
}

/// How to start `cairn serve`.
pub struct Serve {
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    default_flags: bool,
    http_port: u16,
    tmp: Option<tempfile::TempDir>,
    wrapper: Vec<OsString>,
}

impl Serve {
    /// `cairn serve --data-dir <fresh temp dir>/data --http 127.0.0.1:0 --nbd 127.0.0.1:<free>`.
    pub fn new() -> Serve {
        Serve {
            args: Vec::new(),
            envs: Vec::new(),
            cwd: None,
            data_dir: None,
            default_flags: true,
            http_port: 0,
            tmp: None,
            wrapper: Vec::new(),
        }
    }

    /// Listen on this port instead of one the daemon picks: for daemons that must know each
    /// other's address before either starts (take it from [`free_port`]).
    pub fn http_port(mut self, port: u16) -> Serve {
        self.http_port = port;
        self
    }

    /// Pass no flags of our own (only those given with [`Serve::arg`]).
    pub fn without_default_flags(mut self) -> Serve {
        self.default_flags = false;
        self
    }

    /// Use this data dir instead of a fresh one.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Serve {
        self.data_dir = Some(dir.into());
        self
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Serve {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Serve {
        self.envs.push((k.into(), v.into()));
        self
    }

    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Serve {
        self.cwd = Some(dir.into());
        self
    }

    /// Starts the daemon through `cmd` (a program and its arguments, to which the daemon's
    /// command line is appended): `unshare` for a host without something.
    pub fn wrapped_in(mut self, cmd: &[&str]) -> Serve {
        self.wrapper = cmd.iter().map(OsString::from).collect();
        self
    }

    /// Keeps `tmp` alive as long as the daemon.
    pub fn keep(mut self, tmp: tempfile::TempDir) -> Serve {
        self.tmp = Some(tmp);
        self
    }

    /// Spawns the daemon without waiting for it.
    pub fn spawn(mut self) -> Cairn {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut w = scrubbed(Command::new(program));
                w.args(args).arg(cairn_bin());
                w
            }
            None => cairn_cmd(),
        };
        cmd.arg("serve");
        let data_dir = if self.default_flags {
            let dir = match self.data_dir.take() {
                Some(d) => d,
                None => {
                    let tmp = temp_dir();
                    let d = tmp.path().join("data");
                    self.tmp.get_or_insert(tmp);
                    d
                }
            };
            cmd.arg("--data-dir").arg(&dir);
            cmd.arg("--http")
                .arg(format!("127.0.0.1:{}", self.http_port));
            cmd.arg("--nbd").arg(format!("127.0.0.1:{}", free_port()));
            Some(dir)
        } else {
            self.data_dir.take()
        };
        cmd.args(&self.args);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn cairn");
        let logs = Logs::collect(child.stderr.take().expect("stderr piped"));
        Cairn {
            child,
            logs,
            http: None,
            data_dir,
            exit: None,
            _tmp: self.tmp,
        }
    }

    /// Spawns the daemon and waits until `/healthz` answers 200.
    pub fn start(self) -> Cairn {
        let mut c = self.spawn();
        c.wait_ready();
        c
    }
}

impl Default for Serve {
    fn default() -> Self {
        Serve::new()
    }
}

/// A running (or exited) `cairn serve`. Killed on drop if still running.
pub struct Cairn {
    child: Child,
    pub logs: Logs,
    http: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    exit: Option<ExitStatus>,
    _tmp: Option<tempfile::TempDir>,
}

/// A response, whatever its status.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
    /// Response headers, names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Reply {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// `GET url`, any status. `Err` only for transport failures.
pub fn http_get(url: &str) -> Result<Reply, ureq::Error> {
    http_request("GET", url, &[], None)
}

/// Any method with headers and an optional `(content type, body)`, any status. `Err` only for
/// transport failures.
pub fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &str)>,
) -> Result<Reply, ureq::Error> {
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some((ctype, _)) = body {
        req = req.header("content-type", ctype);
    }
    let agent = agent();
    let mut resp = match body {
        Some((_, b)) => agent.run(req.body(b.to_owned()).expect("request"))?,
        None => agent.run(req.body(()).expect("request"))?,
    };
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.body_mut().read_to_string()?;
    Ok(Reply {
        status,
        content_type,
        body,
        headers,
    })
}

impl Cairn {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    /// The data dir given with `--data-dir`, if the harness chose it.
    pub fn data_dir(&self) -> &Path {
        self.data_dir
            .as_deref()
            .expect("data dir known to the harness")
    }

    /// The admin HTTP address (known once ready).
    pub fn http(&self) -> SocketAddr {
        self.http.expect("daemon not ready yet")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http())
    }

    /// `method path` with headers and an optional `(content type, body)`; panics (with the
    /// daemon's logs) only on transport failure.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, &str)>,
    ) -> Reply {
        http_request(method, &self.url(path), headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n--- logs ---\n{}", self.logs.text()))
    }

    pub fn get(&self, path: &str) -> Reply {
        http_get(&self.url(path))
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n--- logs ---\n{}", self.logs.text()))
    }

    /// Waits for the listening line, then for `/healthz` to answer 200.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let Some(line) = self.logs.wait_for(READY_TIMEOUT, |l| l.contains(LISTENING)) else {
            let status = self.try_exit();
            panic!(
                "cairn did not log {LISTENING:?} (exit: {status:?})\n--- logs ---\n{}",
                self.logs.text()
            );
        };
        let addr = parse_listening_addr(&line).unwrap_or_else(|| panic!("no address in {line:?}"));
        self.http = Some(addr);
        let url = self.url("/healthz");
        // Bounded readiness poll: the listener is bound before the line is logged, so the
        // first try normally succeeds.
        loop {
            if http_get(&url).is_ok_and(|r| r.status == 200) {
                return;
            }
            if let Some(status) = self.try_exit() {
                panic!(
                    "cairn exited ({status}) before it was ready\n--- logs ---\n{}",
                    self.logs.text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "/healthz not 200 within {READY_TIMEOUT:?}\n--- logs ---\n{}",
                self.logs.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait");
        }
        self.exit
    }

    /// Waits for the process to exit (it closes stderr as it goes); fails the test with the
    /// logs if it does not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if !self.logs.wait_eof(timeout) {
            let _ = self.child.kill();
            panic!(
                "cairn did not exit within {timeout:?}\n--- logs ---\n{}",
                self.logs.text()
            );
        }
        let status = self.child.wait().expect("wait");
        self.exit = Some(status);
        status
    }

    /// Sends `sig` and waits for the exit.
    pub fn stop_with(&mut self, sig: libc::c_int) -> ExitStatus {
        self.signal(sig);
        self.wait_exit(EXIT_TIMEOUT)
    }
}

impl Drop for Cairn {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A killed daemon leaves its FUSE mount behind, dead; the next start would detach
        // it, but a test's data dir is not started again.
        if let Some(dir) = &self.data_dir {
            detach_mount(&dir.join("mnt"));
        }
    }
}

/// `umount -l` of `dir`, if something is mounted there.
pub fn detach_mount(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: `c` is a valid NUL-terminated path; umount2 only reads it.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Runs `cairn <args>` to completion: (exit status, stdout, stderr).
pub fn run_cairn(args: &[&str]) -> (ExitStatus, String, String) {
    let out = cairn_cmd().args(args).output().expect("run cairn");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One sample of a metrics exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// `{a="x",b="y\"z"}` → map; returns the rest of the line after `}`.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = rest[eq + 1..].char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label {name} value not quoted"));
        }
        let mut value = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                '"' => {
                    end = Some(eq + 1 + i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.ok_or("unterminated label value")?;
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("duplicate label {name}"));
        }
        rest = &rest[end..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parses Prometheus / OpenMetrics text exposition strictly enough to catch malformed
/// output: names, label syntax, numeric values, a `# TYPE` before each family's samples,
/// nothing after `# EOF`.
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>, String> {
    const TYPES: [&str; 9] = [
        "counter",
        "gauge",
        "histogram",
        "gaugehistogram",
        "summary",
        "info",
        "stateset",
        "unknown",
        "untyped",
    ];
    const SUFFIXES: [&str; 6] = ["_total", "_created", "_bucket", "_count", "_sum", "_info"];
    let mut typed = HashSet::new();
    let mut samples = Vec::new();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let at = |msg: String| format!("line {}: {msg}: {line:?}", n + 1);
        if eof {
            return Err(at("content after # EOF".into()));
        }
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let kind = parts.next().unwrap_or_default();
            let name = parts.next().unwrap_or_default();
            let rest = parts.next().unwrap_or_default();
            if !valid_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            match kind {
                "TYPE" => {
                    if !TYPES.contains(&rest) {
                        return Err(at(format!("unknown type {rest:?}")));
                    }
                    if !typed.insert(name.to_owned()) {
                        return Err(at("second TYPE for the family".into()));
                    }
                }
                "HELP" | "UNIT" => {}
                other => return Err(at(format!("unknown descriptor {other:?}"))),
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            return Err(at("stray comment or blank line".into()));
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = fields
            .next()
            .and_then(parse_value)
            .ok_or_else(|| at("bad value".into()))?;
        if let Some(ts) = fields.next() {
            ts.parse::<f64>().map_err(|_| at("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let family_typed = typed.contains(name)
            || SUFFIXES
                .iter()
                .any(|s| name.strip_suffix(s).is_some_and(|f| typed.contains(f)));
        if !family_typed {
            return Err(at(format!("sample of {name} before its # TYPE")));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(samples)
}

/// Holds an exclusive lock on a machine-wide file while alive: for tests that need a fixed
/// resource (like the default port 8776), so that concurrent test runs take turns.
pub struct MachineLock(std::fs::File);

impl MachineLock {
    pub fn acquire(name: &str) -> MachineLock {
        let path = std::env::temp_dir().join(format!("cairn-test-{name}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {}", path.display());
        MachineLock(file)
    }
}

/// A program of the pinned test venv (`scripts/setup-test-deps`; `CAIRN_TEST_VENV` overrides
/// where it is). Missing programs fail the test.
pub fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var_os("CAIRN_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/cairn/test-venv")
        });
    let bin = venv.join("bin").join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/setup-test-deps",
        bin.display()
    );
    bin
}

/// What a client command printed, and whether it succeeded.
pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> serde_json::Value {
        assert!(self.ok, "failed:\n{}\n{}", self.stdout, self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

pub fn run(cmd: &mut Command) -> Out {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A command with nothing from the developer's OpenStack environment.
pub fn clean(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("OS_") {
            cmd.env_remove(&k);
        }
    }
    cmd
}

/// `openstack --os-cloud cairn <args>` with the daemon's clouds.yaml.
pub fn osc(c: &Cairn, args: &[&str]) -> Out {
    run(clean(venv_bin("openstack"))
        .env("OS_CLIENT_CONFIG_FILE", c.data_dir().join("clouds.yaml"))
        .args(["--os-cloud", "cairn"])
        .args(args))
}

/// A venv client (`glance`, `cinder`) authenticated as `admin` by the usual environment
/// variables, with its stdin closed: glanceclient uploads whatever a non-terminal stdin
/// holds (its documented `<&-` case).
pub fn os_client(c: &Cairn, program: &str, password: &str) -> Command {
    let mut cmd = clean("sh");
    cmd.args(["-c", "exec \"$0\" \"$@\" <&-"])
        .arg(venv_bin(program))
        .env("OS_AUTH_URL", c.url("/v3"))
        .env("OS_USERNAME", "admin")
        .env("OS_PASSWORD", password)
        .env("OS_PROJECT_NAME", "admin")
        .env("OS_USER_DOMAIN_NAME", "Default")
        .env("OS_PROJECT_DOMAIN_NAME", "Default");
    cmd
}

/// `POST /v3/auth/tokens` for `user` with `password`, scoped to the project `scope` names
/// (`{"id": ...}` or `{"name": ..., "domain": ...}`): the token and the project's id.
pub fn password_token(
    c: &Cairn,
    user: &str,
    password: &str,
    scope: serde_json::Value,
) -> (String, String) {
    let body = serde_json::json!({"auth": {"identity": {"methods": ["password"], "password": {
        "user": {"name": user, "domain": {"name": "Default"}, "password": password}}},
        "scope": {"project": scope}}});
    let r = c.request(
        "POST",
        "/v3/auth/tokens",
        &[],
        Some(("application/json", &body.to_string())),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let t = r.header("x-subject-token").expect("token").to_owned();
    let p = r.json()["token"]["project"]["id"]
        .as_str()
        .expect("project")
        .to_owned();
    (t, p)
}

/// A token for `admin` (password `password`) on the admin project, and that project's id.
pub fn admin_token(c: &Cairn, password: &str) -> (String, String) {
    password_token(
        c,
        "admin",
        password,
        serde_json::json!({"name": "admin", "domain": {"name": "Default"}}),
    )
}

/// Creates project `name` with a user of the same name (password `pw-<name>`) holding `role`
/// on it, through Keystone v3 with `admin_token`; returns that user's token on the project and
/// the project's id.
pub fn project_user(c: &Cairn, admin_token: &str, name: &str, role: &str) -> (String, String) {
    let h = [("x-auth-token", admin_token)];
    let post = |path: &str, body: serde_json::Value| {
        let r = c.request(
            "POST",
            path,
            &h,
            Some(("application/json", &body.to_string())),
        );
        assert_eq!(r.status, 201, "{path}: {}", r.body);
        r.json()
    };
    let id = |v: &serde_json::Value| v.as_str().expect("id").to_owned();
    let project = id(&post(
        "/v3/projects",
        serde_json::json!({"project": {"name": name, "domain_id": "default"}}),
    )["project"]["id"]);
    let password = format!("pw-{name}");
    let user = id(&post(
        "/v3/users",
        serde_json::json!({"user": {"name": name, "password": password,
            "default_project_id": project, "domain_id": "default"}}),
    )["user"]["id"]);
    let roles = c.request("GET", "/v3/roles", &h, None).json();
    let role_id = id(&roles["roles"]
        .as_array()
        .expect("roles")
        .iter()
        .find(|r| r["name"] == role)
        .unwrap_or_else(|| panic!("no role {role}: {roles}"))["id"]);
    let r = c.request(
        "PUT",
        &format!("/v3/projects/{project}/users/{user}/roles/{role_id}"),
        &h,
        None,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    password_token(c, name, &password, serde_json::json!({"id": project}))
}

/// The value of the first sample named `name` on `/metrics`.
pub fn metric(c: &Cairn, name: &str) -> f64 {
    let text = c.get("/metrics").body;
    let samples = parse_metrics(&text).expect("metrics parse");
    samples
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .value
}

/// A Compute server of the token's project, for volumes to attach to.
pub fn server(c: &Cairn, token: &str, project: &str) -> String {
    let r = c.request(
        "POST",
        &format!("/compute/v2.1/{project}/servers"),
        &[("X-Auth-Token", token)],
        Some((
            "application/json",
            &serde_json::json!({"server": {"name": "vm"}}).to_string(),
        )),
    );
    assert!(matches!(r.status, 200 | 202), "{}", r.body);
    r.json()["server"]["id"]
        .as_str()
        .expect("server id")
        .to_owned()
}

/// Attaches `volume` to `server` through Compute; returns the attachment's NBD URI.
pub fn attach(c: &Cairn, token: &str, project: &str, server: &str, volume: &str) -> String {
    let r = c.request(
        "POST",
        &format!("/compute/v2.1/{project}/servers/{server}/os-volume_attachments"),
        &[("X-Auth-Token", token)],
        Some((
            "application/json",
            &serde_json::json!({"volumeAttachment": {"volumeId": volume}}).to_string(),
        )),
    );
    assert!(matches!(r.status, 200 | 202), "{}", r.body);
    r.json()["volumeAttachment"]["nbdUri"]
        .as_str()
        .expect("nbd uri")
        .to_owned()
}

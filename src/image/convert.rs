//! Conversion of image data to raw, from one store object into another, with no copy on
//! disk in between: `qemu-img` reads the source through a read-only internal NBD export and
//! writes into the target's export (`convert -n --target-is-zero`, so holes stay holes).
//!
//! Hostile images (the 2024 qcow2/vmdk CVEs) are handled as Glance and Cinder do since: the
//! bytes are inspected in-process first ([`super::inspect`]) and must be the claimed format,
//! with no backing file, no external data file and no extents naming files; `qemu-img` is
//! then given the format explicitly (never probing), `backing: null` where the format has
//! backing files, only NBD exports as its files (so no image can name a host file), and
//! address-space and CPU limits (`prlimit`). Its own `info` must then agree.

use std::{
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::ObjectReader;
use super::inspect::{self, Format};
use super::qcow2;
use crate::nbd::{ExportLease, InternalExports};
use crate::store::{Store, StoreError};

/// Address space a `qemu-img` process may use (Cinder's and Glance's `qemu-img info` limit).
const QEMU_IMG_AS: u64 = 1 << 30;
/// CPU seconds `qemu-img info` may use (as Cinder and Glance).
const INFO_CPU_SECONDS: u64 = 30;
/// CPU seconds a conversion may use: this much plus one second per [`CPU_BYTES_PER_SECOND`]
/// of virtual size, well above what decompressing a real image costs.
const CONVERT_CPU_BASE: u64 = 120;
const CPU_BYTES_PER_SECOND: u64 = 32 << 20;
/// The most of a failing tool's stderr kept for the error message.
const STDERR_KEEP: usize = 2048;
/// The largest virtual size taken, whatever the store could hold: 64 TiB (Cinder's largest
/// volume is far below; a header claiming more is hostile or broken).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The image is refused: unsafe, not what it claims, or not convertible. The message is
    /// for the operator (`cache_raw_error`, a volume's error).
    #[error("{0}")]
    Refused(String),
    /// `qemu-img` failed on an image that passed the checks.
    #[error("qemu-img {what} failed: {message}")]
    Tool { what: &'static str, message: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What was found out about a source before converting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub format: Format,
    pub virtual_size: u64,
    /// The image's bytes (the source object's length).
    pub len: u64,
}

impl Probe {
    /// Whether the data already is raw content (raw, iso, gpt): a clone, not a conversion.
    pub fn is_raw(&self) -> bool {
        self.format.qemu_driver() == "raw"
    }
}

/// Conversion counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ConvertStats {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub completed: AtomicU64,
    /// Of those, done in-process (qcow2) rather than by `qemu-img`.
    pub in_process: AtomicU64,
    pub failed: AtomicU64,
    /// Virtual bytes of the running conversions, and how many of them are done.
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
}

/// Runs conversions, at most `jobs` at once.
pub struct Converter {
    store: Store,
    socket: PathBuf,
    exports: Arc<InternalExports>,
    slots: Semaphore,
    qemu_img: PathBuf,
    pub stats: ConvertStats,
}

/// One more on a gauge for as long as it lives.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(g: &'a AtomicU64) -> Gauge<'a> {
        g.fetch_add(1, Ordering::Relaxed);
        Gauge(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a job from start to end (also when its task is cancelled).
struct Running<'a> {
    stats: &'a ConvertStats,
    total: u64,
    done: u64,
}

impl Running<'_> {
    fn advance(&mut self, done: u64) {
        let done = done.min(self.total);
        if done > self.done {
            self.stats
                .bytes_done
                .fetch_add(done - self.done, Ordering::Relaxed);
            self.done = done;
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.stats.running.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .bytes_total
            .fetch_sub(self.total, Ordering::Relaxed);
        self.stats
            .bytes_done
            .fetch_sub(self.done, Ordering::Relaxed);
    }
}

fn nbd_file(socket: &str, export: &str) -> Value {
    json!({
        "driver": "nbd",
        "server": {"type": "unix", "path": socket},
        "export": export,
    })
}

/// A `json:` filename that opens `export` as `format`, never a backing file.
fn source_spec(socket: &str, export: &str, format: Format) -> String {
    let mut spec = json!({"driver": format.qemu_driver(), "file": nbd_file(socket, export)});
    if matches!(format, Format::Qcow2 | Format::Qed | Format::Vmdk) {
        spec["backing"] = Value::Null;
    }
    format!("json:{spec}")
}

fn target_spec(socket: &str, export: &str) -> String {
    format!(
        "json:{}",
        json!({"driver": "raw", "file": nbd_file(socket, export)})
    )
}

/// The last lines of a tool's stderr, for an error message.
fn tail(stderr: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr);
    let s = s.trim();
    let start = s.len().saturating_sub(STDERR_KEEP);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    let t = s[start..].trim();
    if t.is_empty() {
        "no message".into()
    } else {
        t.to_owned()
    }
}

async fn read_all(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = r.read_to_end(&mut out).await;
    out
}

/// Parses the last `(12.34/100%)` of qemu-img's progress output.
fn last_progress(text: &str) -> Option<f64> {
    let end = text.rfind("/100%)")?;
    let start = text[..end].rfind('(')?;
    text[start + 1..end].trim().parse().ok()
}

impl Converter {
    /// `socket`: the NBD server's unix socket; `exports`: where internal exports are opened.
    pub fn new(
        store: Store,
        socket: PathBuf,
        exports: Arc<InternalExports>,
        jobs: usize,
    ) -> Arc<Converter> {
        Arc::new(Converter {
            store,
            socket,
            exports,
            slots: Semaphore::new(jobs.max(1)),
            qemu_img: std::env::var_os("CAIRN_QEMU_IMG")
                .map(PathBuf::from)
                .unwrap_or_else(|| "qemu-img".into()),
            stats: ConvertStats::default(),
        })
    }

    fn socket(&self) -> String {
        self.socket.to_string_lossy().into_owned()
    }

    /// `qemu-img` under a CPU limit, and the address-space limit for reading untrusted images.
    fn command(&self, cpu_seconds: u64) -> Command {
        self.command_as(cpu_seconds, &QEMU_IMG_AS.to_string())
    }

    fn command_as(&self, cpu_seconds: u64, address_space: &str) -> Command {
        let mut c = Command::new("prlimit");
        c.arg(format!("--as={address_space}"))
            .arg(format!("--cpu={cpu_seconds}"))
            .arg("--")
            .arg(&self.qemu_img)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// `size` bytes of `object` (raw) written as a `format` image file (`vmdk`, `vdi`) at
    /// `dest` by `qemu-img`, which reads the object through a read-only internal export.
    pub async fn export_file(
        &self,
        object: Uuid,
        size: u64,
        format: &str,
        dest: &std::path::Path,
    ) -> Result<(), ConvertError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| ConvertError::Refused("shutting down".into()))?;
        let lease = self.exports.open(object, true, "volume upload");
        let src = format!(
            "json:{}",
            json!({"driver": "raw", "file": nbd_file(&self.socket(), lease.name())})
        );
        // No address-space limit: the source is raw (nothing in it is parsed), and writing
        // a file takes qemu's I/O thread pool, whose stacks and malloc arenas alone can pass
        // the limit kept for reading untrusted images ("qemu_thread_create: Resource
        // temporarily unavailable").
        let out = self
            .command_as(CONVERT_CPU_BASE + size / CPU_BYTES_PER_SECOND, "unlimited")
            .args(["convert", "-q", "-O", format])
            .arg(&src)
            .arg(dest)
            .output()
            .await?;
        if !out.status.success() {
            return Err(ConvertError::Tool {
                what: "convert",
                message: tail(&out.stderr),
            });
        }
        Ok(())
    }

    /// Checks `len` bytes of `object` claimed to be `disk_format`: the in-process inspector
    /// first (nothing else reads an image that fails it), then `qemu-img info` through a
    /// read-only export, which must agree. Returns the format and virtual size.
    pub async fn probe(
        &self,
        object: Uuid,
        len: u64,
        disk_format: &str,
    ) -> Result<Probe, ConvertError> {
        let reader = ObjectReader::new(&self.store, object, len);
        let found = match inspect::inspect(&reader).await {
            Ok(f) => f,
            Err(inspect::InspectError::Multiple(m)) => {
                return Err(ConvertError::Refused(format!(
                    "Image failed safety checks: multiple formats detected: {m}"
                )));
            }
            Err(inspect::InspectError::Io(e)) => return Err(ConvertError::Io(e)),
        };
        inspect::check_claim(disk_format, &found).map_err(ConvertError::Refused)?;
        if let Some(v) = found.virtual_size.filter(|&v| v > MAX_VIRTUAL_SIZE) {
            return Err(ConvertError::Refused(format!(
                "Image failed safety checks: virtual size {v} is above {MAX_VIRTUAL_SIZE} bytes"
            )));
        }
        // A raw claim over content of another format is taken as raw bytes (Glance).
        let format = if disk_format == "raw" {
            Format::Raw
        } else {
            found.format
        };
        if format.qemu_driver() == "raw" {
            return Ok(Probe {
                format,
                virtual_size: len,
                len,
            });
        }
        if !matches!(
            format,
            Format::Qcow2 | Format::Qed | Format::Vhd | Format::Vhdx | Format::Vmdk | Format::Vdi
        ) {
            return Err(ConvertError::Refused(format!(
                "Images of disk_format {disk_format} cannot be converted to raw"
            )));
        }
        let lease = self.exports.open(object, true, "image probe");
        let info = self.info(&lease, format).await?;
        let virtual_size = check_info(&info, format)?;
        self.check_whole(&lease, format, len).await?;
        if let Some(v) = found.virtual_size
            && v != virtual_size
        {
            return Err(ConvertError::Refused(format!(
                "Image failed safety checks: the header's virtual size {v} is not qemu-img's {virtual_size}"
            )));
        }
        Ok(Probe {
            format,
            virtual_size,
            len,
        })
    }

    /// Refuses damaged and truncated images, whose missing parts qemu would read as zeros:
    /// `qemu-img check` where the format has one (leaks pass; corruptions and errors do not),
    /// and `qemu-img map`, whose data extents must all lie inside the image's `len` bytes.
    async fn check_whole(
        &self,
        lease: &ExportLease,
        format: Format,
        len: u64,
    ) -> Result<(), ConvertError> {
        let spec = source_spec(&self.socket(), lease.name(), format);
        let refuse =
            |why: String| ConvertError::Refused(format!("Image failed safety checks: {why}"));
        if matches!(
            format,
            Format::Qcow2 | Format::Qed | Format::Vhdx | Format::Vmdk | Format::Vdi
        ) {
            let out = self
                .command(INFO_CPU_SECONDS)
                .args(["check", "--output=json"])
                .arg(&spec)
                .output()
                .await?;
            // 0: clean; 3: leaked clusters only (space, not data).
            if !matches!(out.status.code(), Some(0 | 3)) {
                let detail = if out.stderr.is_empty() {
                    tail(&out.stdout)
                } else {
                    tail(&out.stderr)
                };
                return Err(refuse(format!(
                    "qemu-img check finds it damaged or truncated: {detail}"
                )));
            }
        }
        let out = self
            .command(INFO_CPU_SECONDS)
            .args(["map", "--output=json"])
            .arg(&spec)
            .output()
            .await?;
        if !out.status.success() {
            return Err(refuse(format!(
                "qemu-img map could not read it: {}",
                tail(&out.stderr)
            )));
        }
        let map: Vec<Value> =
            serde_json::from_slice(&out.stdout).map_err(|e| ConvertError::Tool {
                what: "map",
                message: format!("unreadable output: {e}"),
            })?;
        check_map(&map, len).map_err(refuse)
    }

    async fn info(&self, lease: &ExportLease, format: Format) -> Result<Value, ConvertError> {
        let out = self
            .command(INFO_CPU_SECONDS)
            .args(["info", "--output=json"])
            .arg(source_spec(&self.socket(), lease.name(), format))
            .output()
            .await?;
        if !out.status.success() {
            return Err(ConvertError::Refused(format!(
                "Image failed safety checks: qemu-img info could not read it: {}",
                tail(&out.stderr)
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| ConvertError::Tool {
            what: "info",
            message: format!("unreadable output: {e}"),
        })
    }

    /// Converts the probed source `object` into `target` (an object of at least the virtual
    /// size, all zeros), reporting progress in percent to `progress`. The target is flushed
    /// (durable) when this returns `Ok`.
    pub async fn convert(
        &self,
        object: Uuid,
        probe: Probe,
        target: Uuid,
        mut progress: impl FnMut(u8) + Send,
    ) -> Result<(), ConvertError> {
        let permit = {
            // Counted while waiting, also when the job is cancelled meanwhile.
            let _waiting = Gauge::up(&self.stats.waiting);
            self.slots.acquire().await
        };
        let _permit = permit.map_err(|_| ConvertError::Refused("shutting down".into()))?;
        self.stats.running.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_total
            .fetch_add(probe.virtual_size, Ordering::Relaxed);
        let mut running = Running {
            stats: &self.stats,
            total: probe.virtual_size,
            done: 0,
        };
        let result = self
            .run_convert(object, probe, target, &mut running, &mut progress)
            .await;
        match &result {
            Ok(()) => self.stats.completed.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.failed.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    async fn run_convert(
        &self,
        object: Uuid,
        probe: Probe,
        target: Uuid,
        running: &mut Running<'_>,
        progress: &mut (impl FnMut(u8) + Send),
    ) -> Result<(), ConvertError> {
        if probe.is_raw() {
            return Err(ConvertError::Refused(
                "raw content is cloned, not converted".into(),
            ));
        }
        if probe.format == Format::Qcow2 {
            let header = self
                .store
                .read(object, 0, probe.len.min(512) as usize)
                .await?;
            if qcow2::fits(&header) {
                let started = std::time::Instant::now();
                let mut last = 0u8;
                let total = probe.virtual_size.max(1);
                let result = qcow2::convert(&self.store, object, probe.len, target, |done| {
                    running.advance(done);
                    let pct = (done.min(total) * 100 / total) as u8;
                    if pct != last {
                        last = pct;
                        progress(pct);
                    }
                })
                .await;
                match result {
                    Ok(()) => {
                        let converted = started.elapsed();
                        self.store.flush().await?;
                        self.stats.in_process.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            target = %target,
                            virtual_size = probe.virtual_size,
                            in_process_ms = converted.as_millis() as u64,
                            flush_ms = (started.elapsed() - converted).as_millis() as u64,
                            "image conversion done"
                        );
                        return Ok(());
                    }
                    Err(qcow2::Qcow2Error::Unsupported(e)) => {
                        tracing::info!(
                            target = %target,
                            error = %e,
                            "qcow2 image not readable in-process; converting with qemu-img"
                        );
                    }
                    Err(qcow2::Qcow2Error::Failed(e)) => {
                        return Err(ConvertError::Tool {
                            what: "convert",
                            message: e.to_string(),
                        });
                    }
                }
            }
        }
        let src = self.exports.open(object, true, "image conversion source");
        let dst = self.exports.open(target, false, "image conversion target");
        let socket = self.socket();
        let cpu = CONVERT_CPU_BASE + probe.virtual_size / CPU_BYTES_PER_SECOND;
        let started = std::time::Instant::now();
        let mut child = self
            .command(cpu)
            .args(["convert", "-p", "-n", "--target-is-zero", "-W"])
            .arg(source_spec(&socket, src.name(), probe.format))
            .arg(target_spec(&socket, dst.name()))
            .spawn()?;
        let (Some(mut stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(ConvertError::Tool {
                what: "convert",
                message: "no output pipes".into(),
            });
        };
        let stderr = tokio::spawn(read_all(stderr));
        let mut buf = [0u8; 512];
        let mut pending = String::new();
        let mut last = 0u8;
        loop {
            let n = stdout.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            pending.push_str(&String::from_utf8_lossy(&buf[..n]));
            if let Some(p) = last_progress(&pending) {
                let pct = p.clamp(0.0, 100.0);
                running.advance((probe.virtual_size as f64 * pct / 100.0) as u64);
                let whole = pct as u8;
                if whole != last {
                    last = whole;
                    progress(whole);
                }
            }
            if pending.len() > 4096 {
                pending.drain(..pending.len() - 64);
            }
        }
        let status = child.wait().await?;
        let stderr = stderr.await.unwrap_or_default();
        drop(src);
        drop(dst);
        if !status.success() {
            return Err(ConvertError::Tool {
                what: "convert",
                message: tail(&stderr),
            });
        }
        running.advance(probe.virtual_size);
        let converted = started.elapsed();
        // qemu-img's target cache mode (unsafe, its default) sends no flush: this one makes
        // the target's data and metadata durable before anyone is told it is there.
        self.store.flush().await?;
        tracing::info!(
            target = %target,
            virtual_size = probe.virtual_size,
            qemu_img_ms = converted.as_millis() as u64,
            flush_ms = (started.elapsed() - converted).as_millis() as u64,
            "image conversion done"
        );
        Ok(())
    }
}

/// Every data extent of a `qemu-img map` must lie within the image's `len` bytes.
fn check_map(map: &[Value], len: u64) -> Result<(), String> {
    for e in map {
        if e["data"] != Value::Bool(true) {
            continue;
        }
        let (Some(offset), Some(length)) = (e["offset"].as_u64(), e["length"].as_u64()) else {
            continue;
        };
        if offset.checked_add(length).is_none_or(|end| end > len) {
            return Err(format!(
                "data at offset {offset} ({length} bytes) lies past its end ({len} bytes): it is truncated"
            ));
        }
    }
    Ok(())
}

/// What `qemu-img info` must say of a safe image; returns its virtual size.
fn check_info(info: &Value, format: Format) -> Result<u64, ConvertError> {
    let refuse = |why: String| ConvertError::Refused(format!("Image failed safety checks: {why}"));
    if info["format"].as_str() != Some(format.qemu_driver()) {
        return Err(refuse(format!(
            "qemu-img reads it as {}, not {}",
            info["format"], format
        )));
    }
    if let Some(b) = info.get("backing-filename") {
        return Err(refuse(format!("it names a backing file {b}")));
    }
    let specific = &info["format-specific"]["data"];
    if let Some(d) = specific.get("data-file") {
        return Err(refuse(format!("it names an external data file {d}")));
    }
    if format == Format::Vmdk {
        let kind = specific["create-type"].as_str().unwrap_or("");
        if !matches!(kind, "monolithicSparse" | "streamOptimized") {
            return Err(refuse(format!(
                "VMDK create-type {kind:?} is not monolithicSparse or streamOptimized"
            )));
        }
        let extents = specific["extents"].as_array().map_or(0, Vec::len);
        if extents > 1 {
            return Err(refuse(format!("VMDK with {extents} extents")));
        }
    }
    let Some(size) = info["virtual-size"].as_u64() else {
        return Err(refuse("qemu-img reports no virtual size".into()));
    };
    if size == 0 || size > MAX_VIRTUAL_SIZE {
        return Err(refuse(format!(
            "virtual size {size} is outside 1 byte to {MAX_VIRTUAL_SIZE} bytes"
        )));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_the_last_one_printed() {
        assert_eq!(
            last_progress("    (0.00/100%)\r    (12.50/100%)\r"),
            Some(12.5)
        );
        assert_eq!(last_progress("    (100.00/100%)\r\n"), Some(100.0));
        assert_eq!(last_progress("(12.5"), None);
        assert_eq!(last_progress(""), None);
    }

    #[test]
    fn specs_never_open_backing_files() {
        let s = source_spec("/run/x.sock", "internal/a", Format::Qcow2);
        let v: Value = serde_json::from_str(s.strip_prefix("json:").unwrap()).unwrap();
        assert_eq!(v["driver"], "qcow2");
        assert!(v["backing"].is_null() && v.get("backing").is_some());
        assert_eq!(v["file"]["driver"], "nbd");
        assert_eq!(v["file"]["server"]["path"], "/run/x.sock");
        assert_eq!(v["file"]["export"], "internal/a");
        let s = source_spec("/s", "e", Format::Vhd);
        assert!(s.contains(r#""driver":"vpc""#) && !s.contains("backing"));
    }

    #[test]
    fn info_checks() {
        let ok = json!({"format": "qcow2", "virtual-size": 1 << 30,
                        "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}});
        assert_eq!(check_info(&ok, Format::Qcow2).unwrap(), 1 << 30);
        let mut b = ok.clone();
        b["backing-filename"] = json!("/etc/shadow");
        assert!(
            matches!(check_info(&b, Format::Qcow2), Err(ConvertError::Refused(m)) if m.contains("backing"))
        );
        let mut d = ok.clone();
        d["format-specific"]["data"]["data-file"] = json!("/etc/shadow");
        assert!(
            matches!(check_info(&d, Format::Qcow2), Err(ConvertError::Refused(m)) if m.contains("data file"))
        );
        let huge = json!({"format": "qcow2", "virtual-size": MAX_VIRTUAL_SIZE + 1});
        assert!(check_info(&huge, Format::Qcow2).is_err());
        let wrong = json!({"format": "raw", "virtual-size": 1});
        assert!(check_info(&wrong, Format::Qcow2).is_err());
        let flat = json!({"format": "vmdk", "virtual-size": 1 << 20,
                          "format-specific": {"type": "vmdk", "data": {"create-type": "monolithicFlat"}}});
        assert!(check_info(&flat, Format::Vmdk).is_err());
        let sparse = json!({"format": "vmdk", "virtual-size": 1 << 20,
                            "format-specific": {"type": "vmdk", "data": {"create-type": "streamOptimized", "extents": [{}]}}});
        assert_eq!(check_info(&sparse, Format::Vmdk).unwrap(), 1 << 20);
    }

    #[test]
    fn map_extents_must_lie_inside_the_image() {
        let map = |offset: u64| {
            vec![
                json!({"start": 0, "length": 65536, "data": false, "zero": true}),
                json!({"start": 65536, "length": 65536, "data": true, "offset": offset}),
                json!({"start": 131072, "length": 65536, "data": true, "compressed": true}),
            ]
        };
        assert!(check_map(&map(0), 65536).is_ok());
        assert!(check_map(&map(1), 65536).unwrap_err().contains("truncated"));
        assert!(check_map(&map(u64::MAX), 1 << 40).is_err());
    }

    /// A job cancelled while it waits for a slot leaves the gauges as they were.
    #[tokio::test]
    async fn a_job_cancelled_while_waiting_is_no_longer_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::store::StoreOptions::default())
            .await
            .unwrap();
        let conv = Converter::new(
            store.clone(),
            dir.path().join("nbd.sock"),
            Arc::new(InternalExports::default()),
            1,
        );
        let held = conv.slots.acquire().await.unwrap();
        let probe = Probe {
            format: Format::Qcow2,
            virtual_size: 1 << 20,
            len: 1 << 20,
        };
        let job = tokio::spawn({
            let conv = conv.clone();
            async move {
                let _ = conv
                    .convert(Uuid::new_v4(), probe, Uuid::new_v4(), |_| {})
                    .await;
            }
        });
        while conv.stats.waiting.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        job.abort();
        let _ = job.await;
        drop(held);
        assert_eq!(conv.stats.waiting.load(Ordering::Relaxed), 0);
        assert_eq!(conv.stats.running.load(Ordering::Relaxed), 0);
        assert_eq!(conv.stats.bytes_total.load(Ordering::Relaxed), 0);
        store.close().await.unwrap();
    }

    #[test]
    fn tails_are_bounded() {
        assert_eq!(tail(b""), "no message");
        let long = "é".repeat(5000);
        assert!(tail(long.as_bytes()).len() <= STDERR_KEEP);
    }
}

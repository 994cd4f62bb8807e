//! The `cairn` binary: `cairn serve`, `cairn fsck`, `cairn version`.

use std::{
    io::IsTerminal, os::unix::fs::DirBuilderExt, path::Path, process::ExitCode, time::Duration,
};

use anyhow::{Context, Result, bail};
use cairn::{
    catalog::Catalog,
    config::{self, Command, Config, FsckArgs, Layout, LogFormat, LogOptions},
    control::Settings,
    nbd::{CatalogExports, InternalExports, NbdConfig, NbdListeners},
    service::{self, DaemonService},
    store::{self, Store, StoreOptions},
};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// `cairn fsck` exit statuses.
const FSCK_CLEAN: u8 = 0;
const FSCK_ERRORS: u8 = 1;
const FSCK_FAILED: u8 = 2;

fn main() -> ExitCode {
    let cli = config::parse();
    match cli.command {
        Command::Version => {
            print_version();
            ExitCode::SUCCESS
        }
        Command::Fsck(args) => {
            if let Err(e) = init_logging(&cli.log) {
                eprintln!("cairn: {e:#}");
                return ExitCode::from(FSCK_FAILED);
            }
            ExitCode::from(fsck(&args))
        }
        Command::Volume { client, cmd } => client_exit(cairn::client::volume(&client, cmd)),
        Command::Server { client, cmd } => client_exit(cairn::client::server(&client, cmd)),
        Command::Fs { client, cmd } => client_exit(cairn::client::fs(&client, cmd)),
        Command::Project { client, cmd } => client_exit(cairn::client::project(&client, cmd)),
        Command::User { client, cmd } => client_exit(cairn::client::user(&client, cmd)),
        Command::Serve(cfg) => {
            if let Err(e) = init_logging(&cli.log) {
                eprintln!("cairn: {e:#}");
                return ExitCode::from(2);
            }
            match run_serve(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("cairn serve failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn client_exit(r: Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_version() {
    let v = service::version_info();
    println!("{} {}", v.name, v.version);
    println!("commit: {}", v.git_commit.as_deref().unwrap_or("unknown"));
    println!("store format version: {}", v.store_format_version);
    println!("catalog schema version: {}", v.catalog_schema_version);
}

/// Logs go to stderr: human-readable text (coloured on a terminal) or JSON lines.
fn init_logging(opts: &LogOptions) -> Result<()> {
    let filter = match (&opts.log_level, std::env::var("RUST_LOG")) {
        (Some(level), _) => {
            EnvFilter::try_new(level).with_context(|| format!("invalid --log-level {level:?}"))?
        }
        (None, Ok(env)) if !env.is_empty() => {
            EnvFilter::try_new(&env).with_context(|| format!("invalid RUST_LOG {env:?}"))?
        }
        (None, _) => EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match opts.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}

fn fsck(args: &FsckArgs) -> u8 {
    let layout = match Layout::new(&args.data_dir, None, None) {
        Ok(l) => l,
        Err(e) => {
            error!("cannot resolve {}: {e}", args.data_dir.display());
            return FSCK_FAILED;
        }
    };
    if !layout.store_dir.is_dir() {
        error!(
            "no store at {} (is --data-dir right?)",
            layout.store_dir.display()
        );
        return FSCK_FAILED;
    }
    info!(store = %layout.store_dir.display(), repair = args.repair, "checking the store");
    let report = match store::fsck(&layout.store_dir, args.repair) {
        Ok(r) => r,
        Err(e) => {
            error!("fsck could not run on {}: {e}", layout.store_dir.display());
            return FSCK_FAILED;
        }
    };
    let found = !report.errors.is_empty();
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                error!("cannot encode the report: {e}");
                return FSCK_FAILED;
            }
        }
    } else {
        print_report(&layout.store_dir, &report);
    }
    if found { FSCK_ERRORS } else { FSCK_CLEAN }
}

/// Human form of the fsck report: the errors and repairs, then every other field the report
/// carries (so new fields show up without changes here).
fn print_report(dir: &Path, report: &store::FsckReport) {
    println!("fsck {}", dir.display());
    for (title, items) in [("error", &report.errors), ("repaired", &report.repaired)] {
        for item in items {
            println!("  {title}: {item}");
        }
    }
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(report) {
        for (key, value) in fields {
            if key == "errors" || key == "repaired" {
                continue;
            }
            match value {
                serde_json::Value::Array(items) => {
                    for item in items {
                        println!("  {key}: {}", plain(&item));
                    }
                }
                other => println!("  {key}: {}", plain(&other)),
            }
        }
    }
    println!(
        "{}: {} error(s), {} repaired",
        if report.errors.is_empty() {
            "clean"
        } else {
            "PROBLEMS FOUND"
        },
        report.errors.len(),
        report.repaired.len()
    );
}

fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// glibc's malloc raises its mmap threshold to the size of the largest mmapped block freed
/// so far (up to 32 MiB), after which such blocks come from the arenas and stay there: every
/// password login (argon2 works in 19 MiB) left 19 MiB more resident, without bound while the
/// thread lived. Fixed thresholds turn that adjustment off: blocks of 8 MiB and more are
/// mapped and returned when freed; smaller ones (I/O buffers, up to 4 MiB) come from the
/// arenas as before, which give back free space above 16 MiB.
fn pin_malloc_thresholds() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

fn run_serve(cfg: Config) -> Result<()> {
    pin_malloc_thresholds();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cfg.workers {
        rt.worker_threads(n.into());
    }
    let rt = rt
        .enable_all()
        .thread_name("cairn-worker")
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(serve(cfg));
    // Tasks still running (connections past the shutdown timeout) are dropped here.
    rt.shutdown_timeout(Duration::from_secs(5));
    if result.is_ok() {
        info!("shutdown complete");
    }
    result
}

/// Installs the SIGINT/SIGTERM handlers. The returned receiver turns `true` at the first
/// signal; a second signal exits the process at once.
fn install_signals() -> Result<watch::Receiver<bool>> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!("received {name}, shutting down (send it again to exit at once)");
        let _ = tx.send(true);
        let (name, code) = tokio::select! {
            _ = term.recv() => ("SIGTERM", 143),
            _ = int.recv() => ("SIGINT", 130),
        };
        warn!("received {name} again, exiting now without a clean shutdown");
        std::process::exit(code);
    });
    Ok(rx)
}

async fn shutdown_requested(mut rx: watch::Receiver<bool>) {
    // An error means the signal task is gone, which only happens on exit: treat as a request.
    let _ = rx.wait_for(|requested| *requested).await;
}

/// Creates `dir` (and missing parents) with mode 0700, or checks that it is a directory.
fn create_private_dir(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!("{} exists and is not a directory", dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            info!(dir = %dir.display(), "created the data dir");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("checking {}", dir.display())),
    }
}

async fn serve(cfg: Config) -> Result<()> {
    let shutdown = install_signals()?;
    let layout = cfg.layout()?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        commit = service::GIT_COMMIT.unwrap_or("unknown"),
        data_dir = %layout.data_dir.display(),
        "starting cairn"
    );
    create_private_dir(&layout.data_dir)?;

    // Bind first: a busy port fails fast without touching the store.
    let listener = TcpListener::bind(cfg.http)
        .await
        .with_context(|| format!("binding the admin HTTP address {}", cfg.http))?;

    // The store first: its lock makes a second daemon on the same data dir fail here, before
    // it touches the catalog.
    let store = Store::open(
        &layout.store_dir,
        StoreOptions {
            direct_io: cfg.direct_io,
            ..StoreOptions::default()
        },
    )
    .await
    .with_context(|| format!("opening the store in {}", layout.store_dir.display()))?;
    info!(dir = %layout.store_dir.display(), direct_io = cfg.direct_io, "store open");

    let catalog = match Catalog::open(&layout.catalog_path).await {
        Ok(c) => c,
        Err(e) => {
            if let Err(ce) = store.close().await {
                warn!("closing the store after a failed start: {ce}");
            }
            return Err(e)
                .with_context(|| format!("opening the catalog {}", layout.catalog_path.display()));
        }
    };
    info!(path = %layout.catalog_path.display(), "catalog open");

    let served = run(
        &cfg,
        &layout,
        listener,
        store.clone(),
        catalog.clone(),
        shutdown,
    )
    .await;

    // Close everything whatever happened above; report the first error.
    info!("closing the store");
    let store_closed = store
        .close()
        .await
        .context("closing the store (flush and checkpoint)");
    info!("closing the catalog");
    let catalog_closed = catalog.close().await.context("closing the catalog");
    served.and(store_closed).and(catalog_closed)
}

/// Everything between "store and catalog open" and "closing them".
async fn run(
    cfg: &Config,
    layout: &Layout,
    listener: TcpListener,
    store: Store,
    catalog: Catalog,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let fuse_ok = prepare_nbd_and_fuse(layout)?;
    let mut nbd_cfg = NbdConfig::new(cfg.nbd, layout.nbd_socket.clone());
    nbd_cfg.handshake_timeout = Duration::from_secs(cfg.nbd_handshake_timeout);
    let nbd = NbdListeners::bind(nbd_cfg)
        .await
        .context("starting the NBD server")?;

    let addr = listener.local_addr().context("reading the bound address")?;
    let settings = Settings {
        public_url: cfg
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"))
            .trim_end_matches('/')
            .to_owned(),
        // The bound address, so that `--nbd 127.0.0.1:0` yields usable URIs.
        nbd_url: format!("nbd://{}", nbd.tcp_addr()),
        token_ttl: Duration::from_secs(cfg.token_ttl),
        multiattach_limit: cfg.multiattach_limit,
        image_size_cap: cfg.image_size_cap,
        nbd_socket: layout.nbd_socket.clone(),
        convert_jobs: cfg.image_convert_jobs as usize,
        show_image_direct_url: cfg.show_image_direct_url,
        image_service_url: cfg.image_service_url.clone(),
        identity_url: cfg.identity_url.clone(),
        tmp_dir: scratch_dir(&layout.data_dir)?,
        message_ttl: Duration::from_secs(cfg.message_ttl),
    };
    let internal = std::sync::Arc::new(InternalExports::default());
    let svc = DaemonService::new(store.clone(), catalog.clone(), settings, internal.clone());
    let exports = CatalogExports::new(catalog.clone(), Some(svc.export_fence()), internal);
    let hub = cairn::fs::FsHub::open(
        store.clone(),
        layout.data_dir.join("fs"),
        &layout.catalog_path,
        catalog.access_generation(),
    )
    .await
    .context("opening the shared filesystems")?;
    svc.set_filesystem_data(hub.clone());
    let nbd = nbd.serve(store, std::sync::Arc::new(exports));
    svc.identity()
        .bootstrap(layout, cfg.admin_password.as_deref())
        .await
        .context("bootstrapping identity")?;
    svc.recover()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("recovering images and volumes")?;
    tokio::spawn(svc.images().run_cache_worker());
    let mounted = match fuse_ok {
        Err(why) => {
            svc.set_fuse_status(Err(why));
            None
        }
        Ok(()) => {
            match cairn::fs::fuse::mount(hub.clone(), &layout.mount_dir, cfg.fuse_threads as usize)
            {
                Ok(m) => {
                    info!(mount_dir = %layout.mount_dir.display(), "FUSE views mounted");
                    svc.set_fuse_status(Ok(()));
                    Some(m)
                }
                Err(e) => {
                    warn!(
                        mount_dir = %layout.mount_dir.display(),
                        error = %e,
                        "could not mount the FUSE views: shared filesystems are not served"
                    );
                    svc.set_fuse_status(Err(format!("mounting failed: {e}")));
                    None
                }
            }
        }
    };
    let app = admin_api::router_with_images(svc.clone(), svc.images());
    info!(addr = %addr, "admin HTTP listening");

    let drain = {
        let svc = svc.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown_requested(shutdown).await;
            svc.begin_shutdown();
            info!("admin HTTP: no new connections; letting in-flight requests finish");
        }
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(drain);
    let grace = Duration::from_secs(cfg.shutdown_timeout);
    tokio::select! {
        r = server => r.context("admin HTTP server")?,
        () = async {
            shutdown_requested(shutdown).await;
            tokio::time::sleep(grace).await;
        } => warn!(
            "in-flight HTTP requests did not finish within {}s; closing anyway",
            cfg.shutdown_timeout
        ),
    }
    info!("admin HTTP stopped");
    // Conversions stop before their NBD exports do; the next start runs them again.
    svc.images().stop_jobs().await;
    if let Some(m) = mounted {
        // Unmounting waits for the dispatch threads, which may wait for this runtime.
        tokio::task::spawn_blocking(move || m.unmount()).await.ok();
        info!("FUSE views unmounted");
    }
    // Connections answer what they have read, then close; the store is closed after this.
    nbd.shutdown(grace).await;
    Ok(())
}

/// Checks the NBD socket's directory and makes the mount dir. `Err` inside: why the FUSE
/// views cannot be served (the daemon runs on without them).
fn prepare_nbd_and_fuse(layout: &Layout) -> Result<std::result::Result<(), String>> {
    let socket_dir = layout
        .nbd_socket
        .parent()
        .context("the NBD socket path has no parent directory")?;
    if !socket_dir.is_dir() {
        bail!(
            "the directory of the NBD socket {} does not exist",
            layout.nbd_socket.display()
        );
    }
    // A mount left by a daemon that was killed answers ENOTCONN to everything.
    cairn::fs::fuse::detach_stale(&layout.mount_dir);
    std::fs::create_dir_all(&layout.mount_dir)
        .with_context(|| format!("creating the mount dir {}", layout.mount_dir.display()))?;
    if Path::new("/dev/fuse").exists() {
        Ok(Ok(()))
    } else {
        warn!(
            mount_dir = %layout.mount_dir.display(),
            "/dev/fuse is missing: shared filesystems are not mounted (everything else runs)"
        );
        Ok(Err("/dev/fuse is missing".into()))
    }
}

/// `<data-dir>/tmp`, emptied: what is there was left by a run that stopped mid-upload.
fn scratch_dir(data_dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let dir = data_dir.join("tmp");
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("emptying {}", dir.display())),
    }
    create_private_dir(&dir)?;
    Ok(dir)
}

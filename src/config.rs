//! Command line and configuration.
//!
//! Every setting is a flag and a `CAIRN_*` environment variable (the flag wins), and every
//! default runs: `cairn serve` with nothing set keeps its data in `./cairn-data` and listens on
//! loopback only.

use std::{
    fmt::Write as _,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

pub const DEFAULT_DATA_DIR: &str = "./cairn-data";
pub const DEFAULT_HTTP: &str = "127.0.0.1:8776";
pub const DEFAULT_NBD: &str = "127.0.0.1:10809";
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: &str = "30";

/// The longest path a unix socket address can hold (`sun_path` is 108 bytes with the NUL).
const MAX_UNIX_SOCKET_PATH: usize = 107;

const ABOUT: &str = "cairn: block volumes over NBD from its own checksummed, copy-on-write chunk \
store, with an admin HTTP API (shared filesystems over FUSE and an image cache come later).";

#[derive(Debug, Parser)]
#[command(name = "cairn", version, about = ABOUT, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogOptions,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct LogOptions {
    /// Log format on stderr: `text` for people (coloured on a terminal) or `json` (one object
    /// per line) for machines.
    #[arg(
        long,
        env = "CAIRN_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true,
        display_order = 100
    )]
    pub log_format: LogFormat,

    /// Log filter, in `tracing` EnvFilter syntax (`info`, `warn,cairn=debug`, ...).
    /// [default: RUST_LOG if set, else `info`]
    #[arg(
        long,
        env = "CAIRN_LOG_LEVEL",
        value_name = "FILTER",
        global = true,
        display_order = 101
    )]
    pub log_level: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: the store, the catalog, the admin HTTP API and the NBD server (FUSE
    /// arrives later). SIGINT or SIGTERM shut it down cleanly; a second signal exits at once.
    Serve(Config),
    /// Check the store in a data dir (the daemon must not be running on it). Exit status:
    /// 0 clean, 1 problems found (even if repaired), 2 the check could not run.
    Fsck(FsckArgs),
    /// Print the version, git commit and on-disk format versions.
    Version,
    /// Volumes of a running daemon (through its Compute API). `cairn volume create --size 10G
    /// --attach bench` prints the NBD URI of a fresh, attached volume.
    Volume {
        #[command(flatten)]
        client: crate::client::ClientArgs,
        #[command(subcommand)]
        cmd: crate::client::VolumeCmd,
    },
    /// Servers (instances) of a running daemon.
    Server {
        #[command(flatten)]
        client: crate::client::ClientArgs,
        #[command(subcommand)]
        cmd: crate::client::ServerCmd,
    },
    /// Shared filesystems of a running daemon (seed 002's os-filesystem).
    Fs {
        #[command(flatten)]
        client: crate::client::ClientArgs,
        #[command(subcommand)]
        cmd: crate::client::FsCmd,
    },
    /// Projects of a running daemon (admin).
    Project {
        #[command(flatten)]
        client: crate::client::ClientArgs,
        #[command(subcommand)]
        cmd: crate::client::ProjectCmd,
    },
    /// Users of a running daemon (admin).
    User {
        #[command(flatten)]
        client: crate::client::ClientArgs,
        #[command(subcommand)]
        cmd: crate::client::UserCmd,
    },
}

/// The daemon's configuration.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Directory holding everything cairn keeps: `store/`, `catalog.sqlite`, the NBD socket and
    /// the FUSE mount dir. Created (mode 0700) on first start.
    #[arg(long, env = "CAIRN_DATA_DIR", value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Address of the admin HTTP API (`/healthz`, `/metrics`, `/version`, the REST APIs).
    /// Port 0 picks a free port (logged at startup).
    #[arg(long, env = "CAIRN_HTTP", value_name = "ADDR", default_value = DEFAULT_HTTP)]
    pub http: SocketAddr,

    /// TCP address of the NBD server.
    #[arg(long, env = "CAIRN_NBD", value_name = "ADDR", default_value = DEFAULT_NBD)]
    pub nbd: SocketAddr,

    /// Unix socket of the NBD server. [default: <data-dir>/nbd.sock]
    #[arg(long, env = "CAIRN_NBD_SOCKET", value_name = "PATH")]
    pub nbd_socket: Option<PathBuf>,

    /// Directory under which the FUSE views are mounted. [default: <data-dir>/mnt]
    #[arg(long, env = "CAIRN_MOUNT_DIR", value_name = "DIR")]
    pub mount_dir: Option<PathBuf>,

    /// Use O_DIRECT for store data I/O instead of the page cache.
    #[arg(
        long,
        env = "CAIRN_DIRECT_IO",
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    pub direct_io: bool,

    /// On SIGINT/SIGTERM, how long in-flight HTTP requests may take to finish before the store
    /// is closed anyway.
    #[arg(
        long,
        env = "CAIRN_SHUTDOWN_TIMEOUT",
        value_name = "SECONDS",
        default_value = DEFAULT_SHUTDOWN_TIMEOUT_SECS
    )]
    pub shutdown_timeout: u64,

    /// Password of the bootstrap `admin` user, set when the catalog is first created. Without
    /// it a random one is generated. Either way it is written to `<data-dir>/clouds.yaml`.
    #[arg(
        long,
        env = "CAIRN_ADMIN_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub admin_password: Option<String>,

    /// Lifetime of issued tokens.
    #[arg(
        long,
        env = "CAIRN_TOKEN_TTL",
        value_name = "SECONDS",
        default_value = "3600"
    )]
    pub token_ttl: u64,

    /// How many servers a multi-attach volume may be attached to at once (others: 1).
    #[arg(
        long,
        env = "CAIRN_MULTIATTACH_LIMIT",
        value_name = "N",
        default_value = "16"
    )]
    pub multiattach_limit: u32,

    /// The largest image upload taken, in bytes (Glance's `image_size_cap`).
    #[arg(
        long,
        env = "CAIRN_IMAGE_SIZE_CAP",
        value_name = "BYTES",
        default_value = "1099511627776",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub image_size_cap: u64,

    /// Image conversions (raw caches, volumes filled from images) run at once; more wait.
    #[arg(
        long,
        env = "CAIRN_IMAGE_CONVERT_JOBS",
        value_name = "N",
        default_value = "2",
        value_parser = clap::value_parser!(u32).range(1..=64)
    )]
    pub image_convert_jobs: u32,

    /// Show an image's `direct_url` (Glance's `show_image_direct_url`): the NBD URL of its
    /// raw content, once it has some. Off, as in Glance: it tells clients where data lives.
    #[arg(
        long,
        env = "CAIRN_SHOW_IMAGE_DIRECT_URL",
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    pub show_image_direct_url: bool,

    /// How long a Block Storage user message (`/messages`, e.g. an upload to an image that
    /// failed) is kept at least: its `guaranteed_until` (cinder's `message_ttl`, 30 days).
    #[arg(
        long,
        env = "CAIRN_MESSAGE_TTL",
        value_name = "SECONDS",
        default_value = "2592000"
    )]
    pub message_ttl: u64,

    /// An NBD client must finish its handshake (options up to GO/EXPORT_NAME) within this
    /// time, or its connection is closed. 0 is refused.
    #[arg(
        long,
        env = "CAIRN_NBD_HANDSHAKE_TIMEOUT",
        value_name = "SECONDS",
        default_value = "30",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub nbd_handshake_timeout: u64,

    /// FUSE dispatch threads, each with its own /dev/fuse descriptor. They decode requests
    /// and hand data operations to the runtime, so a few serve many requests.
    #[arg(
        long,
        env = "CAIRN_FUSE_THREADS",
        value_name = "N",
        default_value = "4",
        value_parser = clap::value_parser!(u16).range(1..=64)
    )]
    pub fuse_threads: u16,

    /// Base URL clients use to reach the admin API, for the service catalog and clouds.yaml.
    /// [default: http://<the --http address>]
    #[arg(long, env = "CAIRN_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,

    /// A Glance-compatible image service (its endpoint, e.g. `http://glance:9292`) that
    /// `os-volume_upload_image` sends volumes to, with the caller's token. Its tokens must be
    /// this daemon's too: see `--identity-url`. [default: this daemon's own image service]
    #[arg(long, env = "CAIRN_IMAGE_SERVICE_URL", value_name = "URL")]
    pub image_service_url: Option<String>,

    /// A Keystone-compatible identity service (its endpoint, e.g. `http://keystone:5000`)
    /// that checks tokens this daemon did not issue, as keystonemiddleware does for an
    /// OpenStack service. [default: only this daemon's own tokens]
    #[arg(long, env = "CAIRN_IDENTITY_URL", value_name = "URL")]
    pub identity_url: Option<String>,

    /// Threads running the daemon's async work (NBD requests, the HTTP API, the store's
    /// callers). Fewer than the CPUs can pay when clients share the machine: see the README.
    /// [default: the number of CPUs]
    #[arg(
        long,
        env = "CAIRN_WORKERS",
        value_name = "N",
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub workers: Option<u16>,
}

#[derive(Debug, Clone, Args)]
pub struct FsckArgs {
    /// Data directory whose store (`<DIR>/store`) to check.
    #[arg(long, env = "CAIRN_DATA_DIR", value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Fix what can be fixed safely (never discards data that could still be read).
    #[arg(long)]
    pub repair: bool,

    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Where everything lives, as absolute paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub data_dir: PathBuf,
    pub store_dir: PathBuf,
    pub catalog_path: PathBuf,
    pub nbd_socket: PathBuf,
    pub mount_dir: PathBuf,
}

impl Layout {
    /// The layout of a data dir: `store/`, `catalog.sqlite`, and the given or default NBD
    /// socket and mount dir.
    pub fn new(
        data_dir: &Path,
        nbd_socket: Option<&Path>,
        mount_dir: Option<&Path>,
    ) -> io::Result<Layout> {
        let data_dir = std::path::absolute(data_dir)?;
        let nbd_socket = match nbd_socket {
            Some(p) => std::path::absolute(p)?,
            None => data_dir.join("nbd.sock"),
        };
        let mount_dir = match mount_dir {
            Some(p) => std::path::absolute(p)?,
            None => data_dir.join("mnt"),
        };
        Ok(Layout {
            store_dir: data_dir.join("store"),
            catalog_path: data_dir.join("catalog.sqlite"),
            data_dir,
            nbd_socket,
            mount_dir,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot resolve the paths of the data dir: {0}")]
    Path(#[from] io::Error),
    #[error(
        "NBD socket path {path:?} is {len} bytes; unix sockets allow at most {max} \
         (set --nbd-socket / CAIRN_NBD_SOCKET to a shorter path)"
    )]
    SocketPathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
    #[error("--http and --nbd are both {0}; they need different ports")]
    SameAddress(SocketAddr),
}

impl Config {
    /// Resolves the paths and checks what can be checked before anything is opened.
    pub fn layout(&self) -> Result<Layout, ConfigError> {
        let layout = Layout::new(
            &self.data_dir,
            self.nbd_socket.as_deref(),
            self.mount_dir.as_deref(),
        )?;
        let len = layout.nbd_socket.as_os_str().len();
        if len > MAX_UNIX_SOCKET_PATH {
            return Err(ConfigError::SocketPathTooLong {
                path: layout.nbd_socket,
                len,
                max: MAX_UNIX_SOCKET_PATH,
            });
        }
        if self.http == self.nbd && self.http.port() != 0 {
            return Err(ConfigError::SameAddress(self.http));
        }
        Ok(layout)
    }
}

/// Defaults that depend on other settings, for the option table.
fn derived_default(id: &str) -> Option<&'static str> {
    match id {
        "nbd_socket" => Some("<data-dir>/nbd.sock"),
        "mount_dir" => Some("<data-dir>/mnt"),
        "log_level" => Some("RUST_LOG, else info"),
        "direct_io" => Some("off"),
        _ => None,
    }
}

/// A table of every daemon setting: flag, environment variable, default.
pub fn options_table() -> String {
    let root = Cli::command();
    let serve = root
        .find_subcommand("serve")
        .cloned()
        .unwrap_or_else(|| clap::Command::new("serve"));
    let mut rows = vec![("flag".to_owned(), "env".to_owned(), "default".to_owned())];
    for arg in root.get_arguments().chain(serve.get_arguments()) {
        let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
            continue;
        };
        let default = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(",");
        let default = if default.is_empty() {
            derived_default(arg.get_id().as_str())
                .unwrap_or("-")
                .to_owned()
        } else {
            default
        };
        rows.push((
            format!("--{long}"),
            env.to_string_lossy().into_owned(),
            default,
        ));
    }
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (flag, env, default) in rows {
        let _ = writeln!(out, "  {flag:w0$}  {env:w1$}  {default}");
    }
    out
}

/// The clap command with the option table appended to the top-level help.
pub fn command() -> clap::Command {
    Cli::command().after_help(format!(
        "Settings of `cairn serve` (each flag also reads its environment variable; the flag \
         wins):\n{}\nStart with no settings at all: `cairn serve`. More: `cairn serve --help`, \
         README.md, docs/.",
        options_table()
    ))
}

/// Parses the process arguments (exits with usage on error, as clap does).
pub fn parse() -> Cli {
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand and every argument says in a line what it is (`--help`).
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "cairn", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
    }

    fn serve(args: &[&str]) -> Config {
        let mut argv = vec!["cairn", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("parse").command {
            Command::Serve(c) => c,
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn flags_parse_and_derived_paths_follow_the_data_dir() {
        let c = serve(&[
            "--data-dir",
            "/srv/cairn",
            "--http",
            "0.0.0.0:9000",
            "--nbd",
            "127.0.0.1:1",
            "--direct-io",
        ]);
        assert_eq!(c.http, "0.0.0.0:9000".parse().expect("addr"));
        assert!(c.direct_io);
        let l = c.layout().expect("layout");
        assert_eq!(l.data_dir, Path::new("/srv/cairn"));
        assert_eq!(l.store_dir, Path::new("/srv/cairn/store"));
        assert_eq!(l.catalog_path, Path::new("/srv/cairn/catalog.sqlite"));
        assert_eq!(l.nbd_socket, Path::new("/srv/cairn/nbd.sock"));
        assert_eq!(l.mount_dir, Path::new("/srv/cairn/mnt"));

        let c = serve(&[
            "--data-dir",
            "/srv/cairn",
            "--nbd-socket",
            "/run/nbd.sock",
            "--mount-dir",
            "/mnt/cairn",
        ]);
        let l = c.layout().expect("layout");
        assert_eq!(l.nbd_socket, Path::new("/run/nbd.sock"));
        assert_eq!(l.mount_dir, Path::new("/mnt/cairn"));
    }

    #[test]
    fn relative_data_dir_becomes_absolute() {
        let c = serve(&["--data-dir", "rel/dir"]);
        let l = c.layout().expect("layout");
        assert!(l.data_dir.is_absolute());
        assert!(l.data_dir.ends_with("rel/dir"));
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(Cli::try_parse_from(["cairn", "serve", "--http", "localhost"]).is_err());
        assert!(Cli::try_parse_from(["cairn", "--log-format", "yaml", "serve"]).is_err());
        let long = format!("/{}", "x".repeat(200));
        let err = serve(&["--nbd-socket", &long])
            .layout()
            .expect_err("too long");
        assert!(
            matches!(err, ConfigError::SocketPathTooLong { .. }),
            "{err}"
        );
        let err = serve(&["--http", "127.0.0.1:5000", "--nbd", "127.0.0.1:5000"])
            .layout()
            .expect_err("same address");
        assert!(matches!(err, ConfigError::SameAddress(_)), "{err}");
    }

    #[test]
    fn log_options_are_global() {
        let cli = Cli::try_parse_from(["cairn", "serve", "--log-format", "json"]).expect("parse");
        assert_eq!(cli.log.log_format, LogFormat::Json);
        let cli = Cli::try_parse_from(["cairn", "--log-format", "json", "version"]).expect("parse");
        assert_eq!(cli.log.log_format, LogFormat::Json);
    }

    #[test]
    fn options_table_lists_every_setting_with_env_and_default() {
        let table = options_table();
        for needle in [
            "--data-dir",
            "CAIRN_DATA_DIR",
            "./cairn-data",
            "--http",
            "CAIRN_HTTP",
            "127.0.0.1:8776",
            "--nbd ",
            "CAIRN_NBD ",
            "127.0.0.1:10809",
            "CAIRN_NBD_SOCKET",
            "<data-dir>/nbd.sock",
            "CAIRN_MOUNT_DIR",
            "<data-dir>/mnt",
            "CAIRN_LOG_FORMAT",
            "CAIRN_LOG_LEVEL",
            "CAIRN_DIRECT_IO",
            "CAIRN_SHUTDOWN_TIMEOUT",
        ] {
            assert!(table.contains(needle), "{needle:?} missing from\n{table}");
        }
    }

    /// The README's configuration table must name every environment variable.
    #[test]
    fn readme_documents_every_env_var() {
        let readme = include_str!("../README.md");
        let root = Cli::command();
        let serve = root.find_subcommand("serve").cloned().expect("serve");
        for arg in root.get_arguments().chain(serve.get_arguments()) {
            if let Some(env) = arg.get_env() {
                let env = env.to_string_lossy();
                assert!(readme.contains(&*env), "README.md does not mention {env}");
            }
        }
    }
}

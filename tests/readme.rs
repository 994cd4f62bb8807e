//! The README's first session, run word for word: the shell block that follows the sentence
//! naming this file, against a daemon started as `cargo run --release -- serve` starts it (no
//! flags, data in `./cairn-data`). It runs in a directory laid out as the repository is for
//! it: `scripts/` (the repository's), and `target/release/cairn` (this build's binary). The
//! daemon's ports come from the environment (`CAIRN_HTTP`, `CAIRN_NBD`) so that the test does
//! not take the default ones; the block finds them through `clouds.yaml` and the API.

mod common;

use std::process::Command;

use common::{Serve, cairn_bin, free_port, temp_dir};

/// The first ```sh block after the line that names `tests/readme.rs`.
fn first_session() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let after = readme
        .split_once("`tests/readme.rs` runs this block")
        .expect("the README names tests/readme.rs")
        .1;
    let block = after.split_once("```sh\n").expect("a sh block").1;
    block
        .split_once("```")
        .expect("the block's end")
        .0
        .to_owned()
}

#[test]
fn the_readme_first_session_runs_as_written() {
    let script = first_session();
    assert!(script.contains("cairn volume create"), "{script}");
    let root = temp_dir();
    let dir = root.path();
    std::os::unix::fs::symlink(
        concat!(env!("CARGO_MANIFEST_DIR"), "/scripts"),
        dir.join("scripts"),
    )
    .expect("link scripts");
    std::fs::create_dir_all(dir.join("target/release")).expect("target/release");
    std::os::unix::fs::symlink(cairn_bin(), dir.join("target/release/cairn")).expect("link cairn");
    let nbd = format!("127.0.0.1:{}", free_port());
    let _daemon = Serve::new()
        .without_default_flags()
        .current_dir(dir)
        .data_dir(dir.join("cairn-data"))
        .env("CAIRN_HTTP", "127.0.0.1:0")
        .env("CAIRN_NBD", &nbd)
        .start();
    let out = Command::new("bash")
        .current_dir(dir)
        .args(["-euo", "pipefail", "-c", &script])
        .env_remove("OS_CLIENT_CONFIG_FILE")
        .env_remove("OS_CLOUD")
        .output()
        .expect("run the block");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    // A token from the OpenStack CLI.
    assert!(stdout.contains("expires"), "{stdout}");
    // The volume's NBD URI, on the daemon's NBD address.
    let uri = stdout
        .lines()
        .find(|l| l.starts_with("nbd://"))
        .unwrap_or_else(|| panic!("no NBD URI: {stdout}"));
    assert!(uri.starts_with(&format!("nbd://{nbd}/")), "{uri}");
    // Written and read back with the pattern checked.
    assert!(stdout.contains("wrote 1048576/1048576 bytes"), "{stdout}");
    assert!(stdout.contains("read 1048576/1048576 bytes"), "{stdout}");
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
    // And the volume is listed, attached.
    let id = uri.rsplit('/').next().expect("volume id");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(id) && l.contains("in-use")),
        "{stdout}"
    );
}

//! Records the git commit of the build in `CAIRN_GIT_COMMIT` (shown by `cairn version` and
//! `GET /version`). An explicit `CAIRN_GIT_COMMIT` in the build environment wins; outside a git
//! checkout (or without git) the commit is simply unknown.

use std::{path::PathBuf, process::Command};

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=CAIRN_GIT_COMMIT");
    if let Some(commit) = std::env::var("CAIRN_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
    {
        println!("cargo:rustc-env=CAIRN_GIT_COMMIT={commit}");
        return;
    }
    // Rebuild when HEAD moves: HEAD itself (branch switch), the branch ref (new commit), and
    // packed-refs (after gc). `--git-path` resolves worktrees; only existing files are watched
    // (a missing one would rerun this script on every build).
    let mut watch = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watch.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watch {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = std::env::current_dir()
                .map(|cwd| cwd.join(&path))
                .unwrap_or_else(|_| PathBuf::from(&path));
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    if let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) {
        println!("cargo:rustc-env=CAIRN_GIT_COMMIT={commit}");
    }
}

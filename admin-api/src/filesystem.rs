//! Shared filesystems (seed 002's `os-filesystem` extension): the plain types that cross the
//! service trait, and the grammar of their names and sizes.
//!
//! Work in progress (issue 26): the model and its rules; the routes and the FUSE data plane
//! come next.

use time::OffsetDateTime;

use crate::model::{ServiceError, ServiceResult};

/// Who sees a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsScope {
    /// Every instance.
    Global,
    /// Every instance of its project, including those created later.
    Project,
    /// Only the instances connected to it.
    Instance,
}

impl FsScope {
    pub fn as_str(self) -> &'static str {
        match self {
            FsScope::Global => "global",
            FsScope::Project => "project",
            FsScope::Instance => "instance",
        }
    }

    pub fn parse(s: &str) -> Option<FsScope> {
        [FsScope::Global, FsScope::Project, FsScope::Instance]
            .into_iter()
            .find(|f| f.as_str() == s)
    }
}

/// A shared filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filesystem {
    pub id: String,
    pub name: String,
    pub scope: FsScope,
    /// Its project: whose members may change it, and for scope `project` whose instances
    /// see it. `None` for scope `global` (an admin's).
    pub project_id: Option<String>,
    /// The quota, in bytes.
    pub size_bytes: u64,
    /// What the client wrote for the size ("4Gb"), echoed back as the seed does.
    pub size_text: String,
    pub created_at: OffsetDateTime,
}

/// What a client asks for with `PUT .../os-filesystem/{name}`.
#[derive(Debug, Clone)]
pub struct FsRequest {
    /// As written ("4Gb"): checked with [`parse_size`], echoed back.
    pub size_text: String,
    pub scope: FsScope,
    /// For scope `project`: the project (the caller's when absent).
    pub project: Option<String>,
}

/// The longest name: one path component on the mount.
pub const MAX_NAME: usize = 255;

/// A filesystem's name becomes a directory on the mount: one safe path component (letters,
/// digits, `-`, `_`, `.`; not `.` or `..`; not starting with `.`), at most 255 bytes.
pub fn check_name(name: &str) -> ServiceResult<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::BadRequest(format!(
            "Invalid filesystem name '{name}': 1 to {MAX_NAME} letters, digits, '-', '_' or '.', not starting with '.'."
        )))
    }
}

/// Sizes as the seed writes them ("4Gb", "80Gb") and their neighbours: a positive whole number,
/// optional spaces, then a unit of `K`, `M`, `G` or `T` (any case) with an optional `b`/`B`
/// or `iB`; powers of 1024 (the seed's "Gb" are what `df` calls G). A bare number is GiB.
pub fn parse_size(text: &str) -> ServiceResult<u64> {
    let bad = || {
        ServiceError::BadRequest(format!(
            "Invalid size '{text}': a positive whole number with a unit K, M, G or T (e.g. 4Gb)."
        ))
    };
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let n: u64 = t[..digits].parse().map_err(|_| bad())?;
    let unit = t[digits..].trim().to_ascii_lowercase();
    let shift = match unit.as_str() {
        "" | "g" | "gb" | "gib" => 30,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(bad());
    }
    n.checked_mul(1 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_the_seed_writes_them() {
        assert_eq!(parse_size("4Gb").unwrap(), 4 << 30);
        assert_eq!(parse_size("80Gb").unwrap(), 80 << 30);
        assert_eq!(parse_size("80 GB").unwrap(), 80 << 30);
        assert_eq!(parse_size("512Mb").unwrap(), 512 << 20);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        assert_eq!(parse_size("7").unwrap(), 7 << 30);
        for bad in [
            "",
            "Gb",
            "0Gb",
            "-1Gb",
            "4.5Gb",
            "4Pb",
            "4 Gb x",
            "99999999999999Tb",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_safe_path_components() {
        for ok in ["home", "data-set_1", "a.b", "x"] {
            check_name(ok).unwrap();
        }
        let long = "a".repeat(256);
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", long.as_str()] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(FsScope::parse("project"), Some(FsScope::Project));
        assert_eq!(FsScope::parse("Project"), None);
    }
}

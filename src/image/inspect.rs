//! In-process image format inspection: what the bytes are, how large the disk they describe
//! is, and whether it is safe to hand them to `qemu-img`.
//!
//! The rules are those of oslo.utils' `format_inspector` (what Glance and Cinder run since the
//! 2024 image CVEs), read at fixed offsets instead of from a stream: for well-formed images
//! the answers are the same. Where oslo leaves a door open that `qemu-img` would walk
//! through, this is stricter, and says so: a VMDK must carry its own sparse extent (a bare
//! descriptor names other files) and may not name a parent (`parentFileNameHint` is a
//! backing file).
//!
//! Nothing here trusts a size field: every read is bounded by the constants below and by the
//! length of the data.

use std::fmt;
use std::io;

/// Formats the inspector recognises, as Glance names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Raw,
    Qcow2,
    Qed,
    Vhd,
    Vhdx,
    Vmdk,
    Vdi,
    Iso,
    Gpt,
    Luks,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Qed => "qed",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Iso => "iso",
            Format::Gpt => "gpt",
            Format::Luks => "luks",
        }
    }

    /// The name of qemu's block driver for this format.
    pub fn qemu_driver(self) -> &'static str {
        match self {
            Format::Vhd => "vpc",
            Format::Iso | Format::Gpt => "raw",
            other => other.as_str(),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed safety check: the check's name and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub check: &'static str,
    pub message: String,
}

/// What the inspector found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    pub format: Format,
    /// The disk size the header declares (bytes); None when the format has none (raw: the
    /// data's own size is the disk).
    pub virtual_size: Option<u64>,
    /// Failed safety checks; empty when safe.
    pub violations: Vec<Violation>,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("Multiple formats detected: {0}")]
    Multiple(String),
    #[error("image data could not be read: {0}")]
    Io(#[from] io::Error),
}

/// Random access to the bytes of an image.
pub trait ReadAt {
    /// Total length in bytes.
    fn size(&self) -> u64;
    /// Up to `len` bytes from `offset` (fewer only at the end of the data).
    fn read_at(
        &self,
        offset: u64,
        len: usize,
    ) -> impl std::future::Future<Output = io::Result<Vec<u8>>> + Send;
}

impl ReadAt for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    async fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let end = start.saturating_add(len).min(self.len());
        Ok(self[start..end].to_vec())
    }
}

const SECTOR: u64 = 512;
/// VMDK: the embedded descriptor lives at sector 1 and is read up to 1 MiB - 1.
const VMDK_DESC_OFFSET: u64 = 0x200;
const VMDK_DESC_MAX: u64 = (1 << 20) - 1;
const VMDK_GD_AT_END: u64 = u64::MAX;
/// VHDX: the first region table and the bounds of what is read of the metadata region.
const VHDX_REGION_TABLE: u64 = 0x30000;
const VHDX_REGION_LEN: usize = 64 * 1024;
const VHDX_MAX_ENTRIES: u32 = 2047;
const VHDX_METADATA_GUID: [u8; 16] = [
    0x06, 0xA2, 0x7C, 0x8B, 0x90, 0x47, 0x9A, 0x4B, 0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E,
];
const VHDX_VIRTUAL_DISK_SIZE_GUID: [u8; 16] = [
    0x24, 0x42, 0xA5, 0x2F, 0x1B, 0xCD, 0x76, 0x48, 0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8,
];
/// ISO 9660 / UDF: the volume descriptor at sector 16 (of 2 KiB sectors).
const ISO_DESCRIPTOR: u64 = 32768;

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}
fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}
fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .unwrap_or(0)
}
fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}
fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

fn violation(check: &'static str, message: impl Into<String>) -> Violation {
    Violation {
        check,
        message: message.into(),
    }
}

/// Detects the format of `data` and checks it. Every recognised format is tried; more than
/// one match is an error (except an ISO that is also a disk with a partition table, which
/// is an ISO), none is raw.
pub async fn inspect<R: ReadAt + ?Sized>(data: &R) -> Result<Inspection, InspectError> {
    let total = data.size();
    let head = data.read_at(0, 512).await?;
    let mut found: Vec<Inspection> = Vec::new();
    let full_head = head.len() == 512;

    if full_head && head.starts_with(b"QFI\xfb") {
        found.push(qcow2(&head));
    }
    if full_head && head.starts_with(b"QED\0") {
        found.push(Inspection {
            format: Format::Qed,
            virtual_size: None,
            violations: vec![violation("banned", "This file format is not allowed")],
        });
    }
    if head.starts_with(b"conectix") {
        found.push(Inspection {
            format: Format::Vhd,
            virtual_size: full_head.then(|| be64(&head, 40)),
            violations: Vec::new(),
        });
    }
    if head.starts_with(b"vhdxfile") {
        found.push(Inspection {
            format: Format::Vhdx,
            virtual_size: vhdx_size(data).await?,
            violations: Vec::new(),
        });
    }
    if let Some(i) = vmdk(data, &head, total).await? {
        found.push(i);
    }
    if full_head && le32(&head, 0x40) == 0xBEDA_107F {
        found.push(Inspection {
            format: Format::Vdi,
            virtual_size: Some(le64(&head, 0x170)),
            violations: Vec::new(),
        });
    }
    if let Some(i) = iso(data).await? {
        found.push(i);
    }
    if full_head
        && le16(&head, 510) == 0xAA55
        // A FAT boot sector (2 FATs, media 0xF8) is not a partition table.
        && !(head[0x10] == 2 && head[0x15] == 0xF8)
    {
        found.push(Inspection {
            format: Format::Gpt,
            virtual_size: None,
            violations: mbr(&head),
        });
    }
    if head.starts_with(b"LUKS\xba\xbe") {
        let version = head
            .get(6..8)
            .map(|v| u16::from_be_bytes([v[0], v[1]]))
            .unwrap_or(0);
        let payload = u64::from(be32(&head, 104)) * SECTOR;
        found.push(Inspection {
            format: Format::Luks,
            virtual_size: Some(total.saturating_sub(payload)),
            violations: if version == 1 {
                Vec::new()
            } else {
                vec![violation(
                    "version",
                    format!("LUKS version {version} is not supported"),
                )]
            },
        });
    }

    if found.len() == 2
        && found.iter().any(|i| i.format == Format::Iso)
        && found.iter().any(|i| i.format == Format::Gpt)
    {
        found.retain(|i| i.format == Format::Iso);
    }
    match found.len() {
        0 => Ok(Inspection {
            format: Format::Raw,
            virtual_size: None,
            violations: Vec::new(),
        }),
        1 => Ok(found.remove(0)),
        _ => Err(InspectError::Multiple(
            found
                .iter()
                .map(|i| i.format.as_str())
                .collect::<Vec<_>>()
                .join(","),
        )),
    }
}

fn qcow2(head: &[u8]) -> Inspection {
    let version = be32(head, 4);
    let mut violations = Vec::new();
    if be64(head, 8) != 0 {
        violations.push(violation("backing_file", "Image has a backing file"));
    }
    // Incompatible feature bit 2: an external data file (CVE-2024-32498).
    if head[0x4F] & 0x04 != 0 {
        violations.push(violation("data_file", "Image has data_file set"));
    }
    match version {
        2 => {}
        3 if be64(head, 0x48) & !0xF != 0 => violations.push(violation(
            "unknown_features",
            "Unknown QCOW2 features found",
        )),
        3 => {}
        _ => violations.push(violation("unknown_features", "Unsupported qcow2 version")),
    }
    Inspection {
        format: Format::Qcow2,
        virtual_size: Some(be64(head, 24)),
        violations,
    }
}

/// The virtual disk size item of a VHDX's metadata region, if the tables lead to it.
async fn vhdx_size<R: ReadAt + ?Sized>(data: &R) -> io::Result<Option<u64>> {
    let table = data.read_at(VHDX_REGION_TABLE, VHDX_REGION_LEN).await?;
    if le32(&table, 0) != 0x6967_6572 {
        return Ok(None);
    }
    let count = le32(&table, 8);
    if count > VHDX_MAX_ENTRIES {
        return Ok(None);
    }
    let Some(meta) = (0..count as usize)
        .map(|i| 16 + 32 * i)
        .find(|&e| table.get(e..e + 16) == Some(&VHDX_METADATA_GUID[..]))
        .map(|e| le64(&table, e + 16))
    else {
        return Ok(None);
    };
    let region = data.read_at(meta, VHDX_REGION_LEN).await?;
    let entries = usize::from(le16(&region, 10)).min(VHDX_MAX_ENTRIES as usize);
    let Some((offset, len)) = (0..entries)
        .map(|i| 32 + 32 * i)
        .find(|&e| region.get(e..e + 16) == Some(&VHDX_VIRTUAL_DISK_SIZE_GUID[..]))
        .map(|e| (le32(&region, e + 16), le32(&region, e + 20)))
    else {
        return Ok(None);
    };
    if len != 8 {
        return Ok(None);
    }
    let item = data.read_at(meta.saturating_add(offset.into()), 8).await?;
    Ok((item.len() == 8).then(|| le64(&item, 0)))
}

async fn vmdk<R: ReadAt + ?Sized>(
    data: &R,
    head: &[u8],
    total: u64,
) -> io::Result<Option<Inspection>> {
    if !head.starts_with(b"KDMV") {
        // A bare descriptor (text naming extent files elsewhere) is a VMDK too, and a VMDK
        // cairn refuses: its extents are other files.
        let text = head.iter().all(|&b| {
            b.is_ascii_graphic() || b.is_ascii_whitespace() || (0x1c..=0x1f).contains(&b)
        });
        let descriptor = String::from_utf8_lossy(head).to_ascii_lowercase();
        if text && !head.is_empty() && descriptor.contains("createtype=\"") {
            return Ok(Some(Inspection {
                format: Format::Vmdk,
                virtual_size: None,
                violations: vec![violation(
                    "descriptor",
                    "A VMDK descriptor without its own sparse extent is not allowed",
                )],
            }));
        }
        return Ok(None);
    }
    if head.len() < 64 {
        return Ok(None);
    }
    let version = le32(head, 4);
    let capacity = le64(head, 12);
    let desc_sector = le64(head, 28);
    let desc_sectors = le64(head, 36);
    let gd_offset = le64(head, 56);
    if !(1..=3).contains(&version) || desc_sector.checked_mul(SECTOR) != Some(VMDK_DESC_OFFSET) {
        // oslo drops the format on these parse errors: the bytes then claim to be raw.
        return Ok(None);
    }
    let mut violations = Vec::new();
    let desc_len = desc_sectors.saturating_mul(SECTOR).min(VMDK_DESC_MAX);
    let raw = data
        .read_at(VMDK_DESC_OFFSET, usize::try_from(desc_len).unwrap_or(0))
        .await?;
    let raw = match raw.iter().position(|&b| b == 0) {
        Some(nul) => &raw[..nul],
        None => &raw[..],
    };
    let (create_type, desc) = match std::str::from_utf8(raw) {
        Ok(text) if text.is_ascii() => {
            let text = text.to_ascii_lowercase();
            let ty = text
                .split_once("createtype=\"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(ty, _)| ty.to_owned())
                .filter(|ty| ty.len() < 64);
            (ty, Some(text))
        }
        _ => (None, None),
    };
    let allowed = matches!(
        create_type.as_deref(),
        Some("monolithicsparse" | "streamoptimized")
    );
    match &desc {
        None => violations.push(violation("descriptor", "No descriptor found")),
        Some(_) if !allowed => violations.push(violation("descriptor", "Unsupported subformat")),
        Some(text) => violations.extend(check_descriptor(text)),
    }
    if gd_offset == VMDK_GD_AT_END {
        violations.extend(vmdk_footer(data, head, total).await?);
    }
    Ok(Some(Inspection {
        format: Format::Vmdk,
        virtual_size: allowed.then(|| capacity.saturating_mul(SECTOR)),
        violations,
    }))
}

/// oslo's line rules for an embedded descriptor, plus: no parent (a backing file).
fn check_descriptor(text: &str) -> Option<Violation> {
    let mut extents = 0;
    for line in text.split('\n') {
        let line =
            line.trim_matches(|c: char| c.is_ascii_whitespace() || ('\x1c'..='\x1f').contains(&c));
        if line.is_empty() || line.starts_with('#') || line.starts_with("ddb") {
            continue;
        }
        if let Some((key, value)) = line.split_once('=')
            && !key.contains(' ')
        {
            let value = value.trim().trim_matches('"');
            if key.trim() == "parentfilenamehint" && !value.is_empty() {
                return Some(violation(
                    "descriptor",
                    "VMDK images with a parent are not allowed",
                ));
            }
            continue;
        }
        if matches!(line.split(' ').next(), Some("rw" | "rdonly" | "noaccess")) {
            if line.contains('/') {
                return Some(violation("descriptor", "Invalid extent filenames found"));
            }
            extents += 1;
            continue;
        }
        return Some(violation("descriptor", "Invalid VMDK descriptor data"));
    }
    (extents == 0).then(|| violation("descriptor", "No extents found"))
}

/// A streamOptimized VMDK keeps its real header in a footer: it must agree with the first.
async fn vmdk_footer<R: ReadAt + ?Sized>(
    data: &R,
    head: &[u8],
    total: u64,
) -> io::Result<Vec<Violation>> {
    let bad = |m: &str| Ok(vec![violation("footer", m)]);
    if total < 1536 + 512 {
        return bad("Footer marker is invalid");
    }
    let tail = data.read_at(total - 1536, 1536).await?;
    if tail.len() != 1536 {
        return bad("Footer marker is invalid");
    }
    let footer = &tail[512..1024];
    if footer[..4] != head[..4] {
        return bad("Header and footer signature do not match");
    }
    if le32(footer, 4) != le32(head, 4) {
        return bad("Header and footer versions do not match");
    }
    if le64(footer, 28) != le64(head, 28) || le64(footer, 36) != le64(head, 36) {
        return bad("Footer specifies a different descriptor than header");
    }
    if le64(footer, 56) == VMDK_GD_AT_END {
        return bad("Footer indicates another footer");
    }
    let marker = |m: &[u8], kind: u32| {
        le32(m, 8) == 0 && le32(m, 12) == kind && m[16..512].iter().all(|&b| b == 0)
    };
    if !marker(&tail[..512], 3) {
        return bad("Footer marker is invalid");
    }
    if !(le64(&tail[1024..], 0) == 0 && marker(&tail[1024..], 0)) {
        return bad("End-of-stream marker is invalid");
    }
    Ok(Vec::new())
}

async fn iso<R: ReadAt + ?Sized>(data: &R) -> io::Result<Option<Inspection>> {
    let d = data.read_at(ISO_DESCRIPTOR, 2048).await?;
    if d.len() < 2048 || !matches!(&d[1..6], b"CD001" | b"NSR02" | b"NSR03") {
        return Ok(None);
    }
    let size = (d[0] == 1).then(|| u64::from(le32(&d, 80)) * u64::from(le16(&d, 128)));
    Ok(Some(Inspection {
        format: Format::Iso,
        virtual_size: size,
        violations: Vec::new(),
    }))
}

/// The MBR partition entries (a protective GPT entry must be the only one, and proper).
fn mbr(head: &[u8]) -> Vec<Violation> {
    let mut valid = Vec::new();
    let mut protective = false;
    for i in 0..4 {
        let e = &head[446 + 16 * i..462 + 16 * i];
        if e[0] != 0 && e[0] != 0x80 {
            return vec![violation(
                "mbr",
                format!("MBR PTE {i} has invalid boot flag"),
            )];
        }
        if e[4] != 0 {
            valid.push(i);
        }
        if e[4] == 0xEE {
            protective = true;
            if e[1..4] != [0, 2, 0] {
                return vec![violation("mbr", "GPT MBR has invalid start CHS")];
            }
            if le32(e, 8) != 1 {
                return vec![violation("mbr", "GPT MBR has invalid start LBA")];
            }
        }
    }
    if protective && valid != [0] {
        return vec![violation("mbr", "GPT MBR defines invalid extra partitions")];
    }
    if valid.is_empty() {
        return vec![violation("mbr", "GPT MBR has no partitions defined")];
    }
    Vec::new()
}

/// Formats oslo knows: a claim outside them (ami, ari, aki, ploop) cannot be checked.
const INSPECTABLE: [&str; 8] = ["raw", "qcow2", "vhd", "vhdx", "vmdk", "vdi", "iso", "qed"];

/// Whether data inspected as `found` may be used as the claimed `disk_format`: the
/// detected format must be the claimed one (raw may hold anything; a claim the inspector
/// cannot check passes as raw data), and no safety check may have failed (MBR table details
/// aside, as Glance).
pub fn check_claim(disk_format: &str, found: &Inspection) -> Result<(), String> {
    let matches = match (disk_format, found.format) {
        (claimed, f) if claimed == f.as_str() => true,
        // Glance lets a raw claim stand over any content, but still refuses unsafe content
        // (a qcow2 naming a backing file stays dangerous to whoever probes it later).
        ("raw", _) => true,
        (claimed, Format::Raw) => !INSPECTABLE.contains(&claimed),
        _ => false,
    };
    if !matches {
        return Err(format!(
            "The format of the image is ({}) not ({disk_format}): the data does not match the image's disk_format",
            found.format
        ));
    }
    let fatal: Vec<&Violation> = found
        .violations
        .iter()
        .filter(|v| v.check != "mbr")
        .collect();
    if fatal.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "Image failed safety checks: {}",
            fatal
                .iter()
                .map(|v| format!("{} ({})", v.message, v.check))
                .collect::<Vec<_>>()
                .join("; ")
        ))
    }
}

#[cfg(test)]
mod tests;

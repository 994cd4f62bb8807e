//! On-disk formats: superblock, journal records, checkpoint. Pure encode/decode, no I/O.
//! The layout and its invariants are documented in `docs/store-format.md`.
use bytes::{Buf, BufMut};
use uuid::Uuid;

/// 1: the first. 2: `segments/<n>.pcrc`, the previous CRC of every block (a format-1
/// store is upgraded when opened). 3: records reach the journal as they are logged, and a
/// commit names the end of what it commits (`CommitTo`); journals are preallocated. A
/// format-2 binary would take the first `CommitTo` for a torn tail, so it must refuse these.
pub const FORMAT_VERSION: u32 = 3;
/// The first format with previous CRCs (`.pcrc`).
pub const PREV_CRC_VERSION: u32 = 2;
pub const BLOCK: usize = 4096;
pub const BLOCK_SHIFT: u32 = 12;
pub const DEFAULT_CHUNK: u32 = 64 * 1024;
pub const MIN_CHUNK: u32 = 16 * 1024;
/// The per-chunk presence bitmap is a u64: at most 64 blocks.
pub const MAX_CHUNK: u32 = 256 * 1024;
/// Bytes of slot space per segment file.
pub const SEGMENT_BYTES: u64 = 1 << 30;
/// Slots per dirty-region intent (16 MiB of 64 KiB slots).
pub const REGION_SLOTS: u32 = 256;

const SB_MAGIC: &[u8; 8] = b"CAIRNSB\0";
pub const SB_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub chunk_size: u32,
    pub segment_bytes: u64,
    pub store_id: Uuid,
    pub created_unix: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a cairn store (bad superblock magic)")]
    BadMagic,
    #[error("superblock is damaged (checksum mismatch)")]
    BadChecksum,
    #[error("superblock is truncated")]
    Truncated,
    #[error(
        "store format version {found} is newer than this cairn supports ({supported}); refusing to touch it"
    )]
    TooNew { found: u32, supported: u32 },
    #[error("superblock has an invalid value: {0}")]
    Invalid(&'static str),
}

impl Superblock {
    pub fn new(chunk_size: u32) -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            chunk_size,
            segment_bytes: SEGMENT_BYTES,
            store_id: Uuid::new_v4(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    pub fn blocks_per_chunk(&self) -> u32 {
        self.chunk_size / BLOCK as u32
    }

    pub fn slots_per_segment(&self) -> u32 {
        (self.segment_bytes / self.chunk_size as u64) as u32
    }

    pub fn encode(&self) -> [u8; SB_LEN] {
        let mut out = [0u8; SB_LEN];
        let mut b = &mut out[..];
        b.put_slice(SB_MAGIC);
        b.put_u32_le(self.version);
        b.put_u32_le(self.chunk_size);
        b.put_u64_le(self.segment_bytes);
        b.put_slice(self.store_id.as_bytes());
        b.put_u64_le(self.created_unix);
        let crc = crc32fast::hash(&out[..SB_LEN - 4]);
        out[SB_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(raw: &[u8]) -> Result<Superblock, FormatError> {
        if raw.len() < 8 {
            return Err(FormatError::Truncated);
        }
        if &raw[..8] != SB_MAGIC {
            return Err(FormatError::BadMagic);
        }
        if raw.len() < SB_LEN {
            return Err(FormatError::Truncated);
        }
        let mut b = &raw[8..];
        let version = b.get_u32_le();
        // Check the version before the checksum: a newer format may lay out the rest differently.
        if version > FORMAT_VERSION {
            return Err(FormatError::TooNew {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let want = u32::from_le_bytes(raw[SB_LEN - 4..SB_LEN].try_into().expect("4 bytes"));
        if crc32fast::hash(&raw[..SB_LEN - 4]) != want {
            return Err(FormatError::BadChecksum);
        }
        let chunk_size = b.get_u32_le();
        let segment_bytes = b.get_u64_le();
        let mut id = [0u8; 16];
        b.copy_to_slice(&mut id);
        let created_unix = b.get_u64_le();
        if version == 0 {
            return Err(FormatError::Invalid("version 0"));
        }
        if raw.len() != SB_LEN || raw[48..SB_LEN - 4].iter().any(|&b| b != 0) {
            return Err(FormatError::Invalid("length or reserved bytes"));
        }
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(FormatError::Invalid("chunk size"));
        }
        if segment_bytes == 0
            || !segment_bytes.is_multiple_of(chunk_size as u64)
            || segment_bytes > 1 << 40
        {
            return Err(FormatError::Invalid("segment size"));
        }
        Ok(Superblock {
            version,
            chunk_size,
            segment_bytes,
            store_id: Uuid::from_bytes(id),
            created_unix,
        })
    }
}

/// One journal record. Metadata records take effect when a later commit record in the same
/// file covers them (or, after a process crash on the same boot, when they are intact: see
/// `docs/store-format.md`); `Intent` records take effect on their own (they are synced before
/// the in-place writes they announce).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    CreateObject {
        id: Uuid,
        size: u64,
    },
    DeleteObject {
        id: Uuid,
    },
    CloneObject {
        src: Uuid,
        dst: Uuid,
    },
    Resize {
        id: Uuid,
        size: u64,
    },
    SetEntry {
        id: Uuid,
        chunk: u32,
        slot: u32,
        present: u64,
    },
    RemoveEntry {
        id: Uuid,
        chunk: u32,
    },
    Intent {
        region: u32,
    },
    IntentClear {
        region: u32,
    },
    /// Format 2: commits every record before it.
    Commit {
        seq: u64,
    },
    /// Commits every record that starts before byte `end` of its journal file; records
    /// between `end` and this one were logged after the commit began and wait for the next.
    CommitTo {
        seq: u64,
        end: u64,
    },
}

/// Record framing: u32 payload length, u32 CRC32 of (type, payload), u8 type, payload.
pub const RECORD_HEADER: usize = 9;
/// No record payload is larger than this; a larger length is damage, not a record.
const MAX_PAYLOAD: usize = 64;

impl Record {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.put_u32_le(0);
        out.put_u32_le(0);
        match self {
            Record::CreateObject { id, size } => {
                out.put_u8(1);
                out.put_slice(id.as_bytes());
                out.put_u64_le(*size);
            }
            Record::DeleteObject { id } => {
                out.put_u8(2);
                out.put_slice(id.as_bytes());
            }
            Record::CloneObject { src, dst } => {
                out.put_u8(3);
                out.put_slice(src.as_bytes());
                out.put_slice(dst.as_bytes());
            }
            Record::Resize { id, size } => {
                out.put_u8(4);
                out.put_slice(id.as_bytes());
                out.put_u64_le(*size);
            }
            Record::SetEntry {
                id,
                chunk,
                slot,
                present,
            } => {
                out.put_u8(5);
                out.put_slice(id.as_bytes());
                out.put_u32_le(*chunk);
                out.put_u32_le(*slot);
                out.put_u64_le(*present);
            }
            Record::RemoveEntry { id, chunk } => {
                out.put_u8(6);
                out.put_slice(id.as_bytes());
                out.put_u32_le(*chunk);
            }
            Record::Intent { region } => {
                out.put_u8(7);
                out.put_u32_le(*region);
            }
            Record::IntentClear { region } => {
                out.put_u8(8);
                out.put_u32_le(*region);
            }
            Record::Commit { seq } => {
                out.put_u8(9);
                out.put_u64_le(*seq);
            }
            Record::CommitTo { seq, end } => {
                out.put_u8(10);
                out.put_u64_le(*seq);
                out.put_u64_le(*end);
            }
        }
        let payload_len = (out.len() - start - RECORD_HEADER) as u32;
        let crc = crc32fast::hash(&out[start + 8..]);
        out[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode one record from the front of `buf`. `None` means the end of the valid log:
    /// truncated, zero-filled, or failing its checksum (a torn write at the tail).
    pub fn decode(buf: &[u8]) -> Option<(Record, usize)> {
        if buf.len() < RECORD_HEADER {
            return None;
        }
        let len = u32::from_le_bytes(buf[0..4].try_into().ok()?) as usize;
        let crc = u32::from_le_bytes(buf[4..8].try_into().ok()?);
        if len > MAX_PAYLOAD || buf.len() < RECORD_HEADER + len {
            return None;
        }
        let body = &buf[8..RECORD_HEADER + len];
        if crc32fast::hash(body) != crc {
            return None;
        }
        let mut p = &body[1..];
        let uuid = |p: &mut &[u8]| -> Option<Uuid> {
            if p.len() < 16 {
                return None;
            }
            let mut id = [0u8; 16];
            p.copy_to_slice(&mut id);
            Some(Uuid::from_bytes(id))
        };
        let need = |p: &[u8], n: usize| (p.len() == n).then_some(());
        let rec = match body[0] {
            1 => {
                need(p, 24)?;
                Record::CreateObject {
                    id: uuid(&mut p)?,
                    size: p.get_u64_le(),
                }
            }
            2 => {
                need(p, 16)?;
                Record::DeleteObject { id: uuid(&mut p)? }
            }
            3 => {
                need(p, 32)?;
                Record::CloneObject {
                    src: uuid(&mut p)?,
                    dst: uuid(&mut p)?,
                }
            }
            4 => {
                need(p, 24)?;
                Record::Resize {
                    id: uuid(&mut p)?,
                    size: p.get_u64_le(),
                }
            }
            5 => {
                need(p, 32)?;
                Record::SetEntry {
                    id: uuid(&mut p)?,
                    chunk: p.get_u32_le(),
                    slot: p.get_u32_le(),
                    present: p.get_u64_le(),
                }
            }
            6 => {
                need(p, 20)?;
                Record::RemoveEntry {
                    id: uuid(&mut p)?,
                    chunk: p.get_u32_le(),
                }
            }
            7 => {
                need(p, 4)?;
                Record::Intent {
                    region: p.get_u32_le(),
                }
            }
            8 => {
                need(p, 4)?;
                Record::IntentClear {
                    region: p.get_u32_le(),
                }
            }
            9 => {
                need(p, 8)?;
                Record::Commit {
                    seq: p.get_u64_le(),
                }
            }
            10 => {
                need(p, 16)?;
                Record::CommitTo {
                    seq: p.get_u64_le(),
                    end: p.get_u64_le(),
                }
            }
            _ => return None,
        };
        Some((rec, RECORD_HEADER + len))
    }
}

const JOURNAL_MAGIC: &[u8; 8] = b"CAIRNJNL";
pub const JOURNAL_HEADER: usize = 40;

/// Journal file header: magic, format version, generation, store id, CRC.
pub fn encode_journal_header(generation: u64, store_id: Uuid) -> [u8; JOURNAL_HEADER] {
    let mut out = [0u8; JOURNAL_HEADER];
    let mut b = &mut out[..];
    b.put_slice(JOURNAL_MAGIC);
    b.put_u32_le(FORMAT_VERSION);
    b.put_u64_le(generation);
    b.put_slice(store_id.as_bytes());
    let crc = crc32fast::hash(&out[..JOURNAL_HEADER - 4]);
    out[JOURNAL_HEADER - 4..].copy_from_slice(&crc.to_le_bytes());
    out
}

pub fn decode_journal_header(raw: &[u8]) -> Option<(u64, Uuid)> {
    if raw.len() < JOURNAL_HEADER || &raw[..8] != JOURNAL_MAGIC {
        return None;
    }
    let want = u32::from_le_bytes(raw[JOURNAL_HEADER - 4..JOURNAL_HEADER].try_into().ok()?);
    if crc32fast::hash(&raw[..JOURNAL_HEADER - 4]) != want {
        return None;
    }
    let mut b = &raw[8..];
    let _version = b.get_u32_le();
    let generation = b.get_u64_le();
    let mut id = [0u8; 16];
    b.copy_to_slice(&mut id);
    Some((generation, Uuid::from_bytes(id)))
}

/// The format version a journal was written in (its header checked by
/// [`decode_journal_header`]).
pub fn journal_version(raw: &[u8]) -> u32 {
    raw.get(8..12)
        .and_then(|v| v.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

pub fn crc_of_zero_block() -> u32 {
    static ZERO: [u8; BLOCK] = [0; BLOCK];
    crc32fast::hash(&ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn superblock_roundtrip_and_damage() {
        let sb = Superblock::new(DEFAULT_CHUNK);
        let raw = sb.encode();
        assert_eq!(Superblock::decode(&raw), Ok(sb));
        let mut bad = raw;
        bad[20] ^= 1;
        assert_eq!(Superblock::decode(&bad), Err(FormatError::BadChecksum));
        let mut newer = raw;
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert!(matches!(
            Superblock::decode(&newer),
            Err(FormatError::TooNew { .. })
        ));
        assert_eq!(
            Superblock::decode(b"garbage!garbage!"),
            Err(FormatError::BadMagic)
        );
        // Reserved bytes set (CRC made to match) or bytes after the 64: refused.
        let mut reserved = raw;
        reserved[50] = 1;
        let crc = crc32fast::hash(&reserved[..SB_LEN - 4]);
        reserved[SB_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Superblock::decode(&reserved),
            Err(FormatError::Invalid(_))
        ));
        let mut longer = raw.to_vec();
        longer.extend_from_slice(&[0; 64]);
        assert!(matches!(
            Superblock::decode(&longer),
            Err(FormatError::Invalid(_))
        ));
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        let id = any::<u128>().prop_map(Uuid::from_u128);
        prop_oneof![
            (id.clone(), any::<u64>()).prop_map(|(id, size)| Record::CreateObject { id, size }),
            id.clone().prop_map(|id| Record::DeleteObject { id }),
            (id.clone(), id.clone()).prop_map(|(src, dst)| Record::CloneObject { src, dst }),
            (id.clone(), any::<u64>()).prop_map(|(id, size)| Record::Resize { id, size }),
            (id.clone(), any::<u32>(), any::<u32>(), any::<u64>()).prop_map(
                |(id, chunk, slot, present)| Record::SetEntry {
                    id,
                    chunk,
                    slot,
                    present
                }
            ),
            (id, any::<u32>()).prop_map(|(id, chunk)| Record::RemoveEntry { id, chunk }),
            any::<u32>().prop_map(|region| Record::Intent { region }),
            any::<u32>().prop_map(|region| Record::IntentClear { region }),
            any::<u64>().prop_map(|seq| Record::Commit { seq }),
            (any::<u64>(), any::<u64>()).prop_map(|(seq, end)| Record::CommitTo { seq, end }),
        ]
    }

    proptest! {
        #[test]
        fn records_roundtrip(recs in proptest::collection::vec(arb_record(), 0..20)) {
            let mut buf = Vec::new();
            for r in &recs {
                r.encode(&mut buf);
            }
            let mut off = 0;
            let mut out = Vec::new();
            while let Some((r, n)) = Record::decode(&buf[off..]) {
                out.push(r);
                off += n;
            }
            prop_assert_eq!(off, buf.len());
            prop_assert_eq!(out, recs);
        }

        #[test]
        fn decode_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Record::decode(&raw);
            let _ = Superblock::decode(&raw);
            let _ = decode_journal_header(&raw);
        }

        #[test]
        fn torn_tail_is_dropped(rec in arb_record(), cut in 1usize..40) {
            let mut buf = Vec::new();
            rec.encode(&mut buf);
            let keep = buf.len().saturating_sub(cut);
            prop_assert!(Record::decode(&buf[..keep]).is_none());
        }
    }
}

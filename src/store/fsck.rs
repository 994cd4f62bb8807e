//! `cairn fsck`: check every map, reference and checksum of a store that is not open.
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use super::buf::AlignedBuf;
use super::engine::{
    Unmatched, heal_dirty_regions, pread_exact, reclaim_leaks, references_segment,
};
use super::format::BLOCK;
use super::recovery;
use super::segment::Segment;
use super::{Result, StoreError};

#[derive(Debug, Default, serde::Serialize)]
pub struct FsckReport {
    /// Damage: checksum mismatches, broken references. Not repaired (not safe to).
    pub errors: Vec<String>,
    /// Things that are not damage but worth knowing (an unflushed tail after a crash).
    pub notes: Vec<String>,
    /// What `--repair` did.
    pub repaired: Vec<String>,
    pub objects: u64,
    pub slots_in_use: u64,
    pub blocks_checked: u64,
    pub checksum_errors: u64,
    pub leaked_bytes: u64,
    /// Blocks written in place when the store last stopped without a commit; their CRCs
    /// are rewritten by the next open (or `--repair`).
    pub unflushed_blocks: u64,
    /// Blocks of intent regions that match neither of their CRCs while the machine has
    /// restarted since the store was last open: a power loss leaves data and CRC pages
    /// apart. Taken as written (their CRCs recomputed) by the next open (or `--repair`).
    pub restart_blocks: u64,
    /// Regions (16 MiB of slots) with a write intent: the next open re-reads and
    /// re-checksums them. A store closed cleanly has none.
    pub intent_regions: u64,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Check the store in `dir` (which must not be open elsewhere). With `repair`, do only what
/// is safe: re-checksum blocks in regions with in-flight in-place writes (as open would) and
/// punch space nothing references. Checksum mismatches elsewhere are reported, never "fixed".
pub fn fsck(dir: &Path, repair: bool) -> Result<FsckReport> {
    if !dir.join(recovery::SUPERBLOCK).exists() {
        return Err(StoreError::Damaged(format!(
            "{} holds no store (no superblock)",
            dir.display()
        )));
    }
    let _lock = recovery::lock(dir)?;
    let loaded = recovery::load(dir)?;
    let sb = &loaded.sb;
    let meta = &loaded.meta;
    let mut r = FsckReport {
        objects: meta.objects.len() as u64,
        intent_regions: meta.marked.len() as u64,
        ..Default::default()
    };
    for j in &loaded.journals {
        if j.pending > 0 {
            r.notes.push(format!(
                "journal {}: {} records logged since the last flush ({})",
                j.generation,
                j.pending,
                if j.replayed {
                    "the process stopped and the machine did not: replayed at open"
                } else {
                    "the machine restarted, or a later journal carries them: not replayed"
                }
            ));
        }
        if j.torn_bytes > 0 {
            r.notes.push(format!(
                "journal {}: {} bytes after the last valid record (a torn tail)",
                j.generation, j.torn_bytes
            ));
        }
    }
    for j in &loaded.foreign_journals {
        r.notes.push(format!(
            "{}: named like an old journal but not this store's (left alone)",
            j.display()
        ));
    }
    // Judged as open judges it: see `Unmatched`.
    let legacy = sb.version < super::format::PREV_CRC_VERSION;
    let unmatched = Unmatched::for_store(dir, sb);
    let seg_dir = dir.join(recovery::SEGMENTS);
    let mut segments = Vec::new();
    for i in 0..loaded.segments {
        match Segment::open(&seg_dir, i, sb, false, false, false) {
            Ok(s) => {
                if !legacy && s.prev_crc_fd().is_none() {
                    r.errors.push(format!(
                        "segment {i}: its previous-CRC file ({i:08}.pcrc) is missing: blocks \
                         of intent regions cannot be told from damage"
                    ));
                }
                segments.push(Arc::new(s))
            }
            Err(e) if i + 1 == loaded.segments && !references_segment(sb, meta, i) => {
                r.notes.push(format!(
                    "segment {i}: {e}; no map references it (its creation was cut short), \
                     open completes it"
                ));
            }
            Err(e) => {
                r.errors.push(format!("segment {i}: {e}"));
                return Ok(r);
            }
        }
    }
    let sps = sb.slots_per_segment();
    let bpc = sb.blocks_per_chunk();
    let chunk = sb.chunk_size as u64;
    let total = loaded.segments * sps;
    r.slots_in_use = meta.slots.refcnt.iter().filter(|&&c| c > 0).count() as u64;

    let mut verified: HashSet<(u32, u32)> = HashSet::new();
    let mut buf = AlignedBuf::zeroed(sb.chunk_size as usize);
    let mut ids: Vec<_> = meta.objects.keys().copied().collect();
    ids.sort();
    for id in ids {
        let obj = &meta.objects[&id];
        let chunks = obj.size.div_ceil(chunk);
        let mut entries = Vec::new();
        obj.map
            .for_each_in(0, u64::MAX, |c, e| entries.push((c, e)));
        let mut counted = 0u64;
        for (c, e) in entries {
            counted += e.present.count_ones() as u64;
            if c as u64 >= chunks {
                r.errors.push(format!(
                    "object {id}: chunk {c} mapped beyond the object's end"
                ));
            }
            if bpc < 64 && e.present >> bpc != 0 {
                r.errors.push(format!(
                    "object {id}: chunk {c} has presence bits past the chunk"
                ));
            }
            if e.slot >= total {
                r.errors.push(format!(
                    "object {id}: chunk {c} points at slot {} beyond the segments",
                    e.slot
                ));
                continue;
            }
            let seg = &segments[(e.slot / sps) as usize];
            let base = (e.slot % sps) as u64 * chunk;
            if let Err(err) = pread_exact(seg.file(), &mut buf, base) {
                r.errors
                    .push(format!("object {id}: chunk {c}: read failed: {err}"));
                continue;
            }
            for blk in 0..bpc {
                if e.present & (1 << blk) == 0 || !verified.insert((e.slot, blk)) {
                    continue;
                }
                r.blocks_checked += 1;
                let ci = ((e.slot % sps) * bpc + blk) as usize;
                let data = &buf[blk as usize * BLOCK..(blk as usize + 1) * BLOCK];
                let crc = crc32fast::hash(data);
                if crc != seg.crc(ci) {
                    let intent = meta.marked.contains(&super::meta::region_of(e.slot));
                    if intent && seg.crashed_write(ci, crc) {
                        r.unflushed_blocks += 1;
                    } else if intent && unmatched == Unmatched::Written {
                        r.restart_blocks += 1;
                    } else {
                        r.checksum_errors += 1;
                        r.errors.push(format!(
                            "object {id}: checksum mismatch at offset {} (slot {}, block {blk})",
                            c as u64 * chunk + blk as u64 * BLOCK as u64,
                            e.slot
                        ));
                    }
                }
            }
        }
        if counted != obj.allocated_blocks {
            r.errors.push(format!(
                "object {id}: allocated blocks {} but maps hold {counted}",
                obj.allocated_blocks
            ));
        }
    }
    if r.unflushed_blocks > 0 {
        r.notes.push(format!(
            "{} blocks written in place without a commit before the last stop; their checksums are rewritten at open",
            r.unflushed_blocks
        ));
    }
    if r.restart_blocks > 0 {
        r.notes.push(format!(
            "{} blocks of regions written at the time of a machine restart match neither checksum \
             (data and checksums were written back apart); open takes them as written",
            r.restart_blocks
        ));
    }
    for (i, seg) in segments.iter().enumerate() {
        for (_, len) in recovery::scan_leaks(seg.file(), i as u32, sb, meta)? {
            r.leaked_bytes += len;
        }
    }
    if r.leaked_bytes > 0 {
        r.notes.push(format!(
            "{} bytes held by segment files but referenced by no map",
            r.leaked_bytes
        ));
    }
    if repair {
        let healed = heal_dirty_regions(sb, meta, &segments, unmatched)?;
        if healed.restored > 0 {
            r.repaired.push(format!(
                "rewrote the checksums of {} unflushed blocks",
                healed.restored
            ));
        }
        if healed.taken > 0 {
            r.repaired.push(format!(
                "took {} blocks written at the time of a machine restart as written",
                healed.taken
            ));
        }
        let punched = reclaim_leaks(sb, meta, &segments)?;
        if punched > 0 {
            r.repaired.push(format!(
                "returned {punched} unreferenced bytes to the filesystem"
            ));
        }
        for s in &segments {
            s.file().sync_all()?;
            s.sync_crcs()?;
        }
    }
    Ok(r)
}

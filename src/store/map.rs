//! Copy-on-write chunk maps.
//!
//! An object's map is a radix tree (fan-out 256) from chunk index to [`Entry`]. Nodes are
//! `Arc`-shared between objects, so cloning an object shares the root: O(1) whatever its size.
//! A write makes its path unique first (copying at most `levels` nodes).
//!
//! Slot reference counts are counted per *leaf node instance*: a slot is referenced once by
//! every distinct leaf that holds it. Copying a shared leaf therefore increments the counts of
//! the slots in it (bounded by the fan-out), and releasing the last reference to a leaf
//! decrements them. Two objects that share a leaf see a count of one, but neither may write
//! in place: making the path unique copies the leaf first, which raises the count to two.
//!
//! Invariant: all mutation happens under the store's metadata lock, so `Arc` strong counts
//! are exact sharing counts (nothing else holds node references).
use super::meta::HashSet;
use std::ops::ControlFlow;
use std::sync::Arc;

pub const FAN_BITS: u32 = 8;
pub const FAN: usize = 1 << FAN_BITS;
/// Chunk indices are u32, so four levels cover every object.
pub const MAX_LEVELS: u8 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub slot: u32,
    /// Bit i set: 4 KiB block i of the chunk holds data; clear: reads as zeros.
    pub present: u64,
}

#[derive(Clone, Debug)]
pub enum Node {
    /// Always `FAN` long.
    Inner(Vec<Option<Arc<Node>>>),
    /// Sorted by index; sparse so that small objects stay small in memory.
    Leaf(Vec<(u8, Entry)>),
}

/// Receives slot reference changes caused by map mutations, with the blocks each holding
/// leaf has (so that a receiver can tell which blocks of a shared slot anyone still holds).
pub trait SlotRefs {
    /// A leaf holding `slot` with blocks `present` came to be.
    fn incref(&mut self, slot: u32, present: u64);
    /// A leaf holding `slot` with blocks `present` let go of it.
    fn decref(&mut self, slot: u32, present: u64);
    /// A leaf's entry kept `slot` and changed its blocks from `old` to `new`.
    fn update(&mut self, slot: u32, old: u64, new: u64);
}

#[derive(Clone, Debug, Default)]
pub struct Map {
    root: Option<Arc<Node>>,
    levels: u8,
}

pub fn levels_for(chunks: u64) -> u8 {
    let mut levels = 1u8;
    let mut cap = FAN as u64;
    while cap < chunks && levels < MAX_LEVELS {
        levels += 1;
        cap <<= FAN_BITS;
    }
    levels
}

fn child_index(idx: u32, level: u8) -> usize {
    // level counts remaining levels including this one; leaves are level 1.
    ((idx >> (FAN_BITS * (level as u32 - 1))) as usize) & (FAN - 1)
}

fn empty_node(level: u8) -> Node {
    if level == 1 {
        Node::Leaf(Vec::new())
    } else {
        Node::Inner(vec![None; FAN])
    }
}

/// Make `node` exclusively ours, copying it (and accounting the copy) if it is shared.
fn make_unique<'a>(node: &'a mut Arc<Node>, refs: &mut dyn SlotRefs) -> &'a mut Node {
    if Arc::strong_count(node) > 1 {
        let copy = (**node).clone();
        if let Node::Leaf(entries) = &copy {
            for (_, e) in entries {
                refs.incref(e.slot, e.present);
            }
        }
        *node = Arc::new(copy);
    }
    Arc::get_mut(node).expect("node is unique after copy")
}

fn release_node(node: Arc<Node>, refs: &mut dyn SlotRefs) {
    if let Ok(node) = Arc::try_unwrap(node) {
        match node {
            Node::Inner(children) => {
                for c in children.into_iter().flatten() {
                    release_node(c, refs);
                }
            }
            Node::Leaf(entries) => {
                for (_, e) in entries {
                    refs.decref(e.slot, e.present);
                }
            }
        }
    }
}

impl Map {
    pub fn new(chunks: u64) -> Map {
        Map {
            root: None,
            levels: levels_for(chunks),
        }
    }

    pub fn levels(&self) -> u8 {
        self.levels
    }

    pub fn root(&self) -> Option<&Arc<Node>> {
        self.root.as_ref()
    }

    pub fn from_parts(root: Option<Arc<Node>>, levels: u8) -> Map {
        Map { root, levels }
    }

    /// Grow the tree so that `chunks` chunk indices fit. Never shrinks.
    pub fn ensure_capacity(&mut self, chunks: u64) {
        let want = levels_for(chunks);
        while self.levels < want {
            if let Some(old) = self.root.take() {
                let mut children = vec![None; FAN];
                children[0] = Some(old);
                self.root = Some(Arc::new(Node::Inner(children)));
            }
            self.levels += 1;
        }
    }

    pub fn get(&self, idx: u32) -> Option<Entry> {
        let mut node = self.root.as_deref()?;
        let mut level = self.levels;
        if level < MAX_LEVELS && (idx as u64) >> (FAN_BITS * level as u32) != 0 {
            return None;
        }
        loop {
            match node {
                Node::Inner(children) => {
                    node = children[child_index(idx, level)].as_deref()?;
                    level -= 1;
                }
                Node::Leaf(entries) => {
                    let key = child_index(idx, 1) as u8;
                    // Dense leaves hold key k at position k: try that before searching.
                    if let Some((k, e)) = entries.get(key as usize)
                        && *k == key
                    {
                        return Some(*e);
                    }
                    return entries
                        .binary_search_by_key(&key, |(k, _)| *k)
                        .ok()
                        .map(|i| entries[i].1);
                }
            }
        }
    }

    /// Make the path to `idx` unique (copying shared nodes) so the caller can judge whether
    /// the slot there is shared by looking at its reference count alone.
    pub fn unshare_path(&mut self, idx: u32, refs: &mut dyn SlotRefs) {
        if self.get(idx).is_none() {
            return;
        }
        let levels = self.levels;
        let mut node = self.root.as_mut().expect("root exists when an entry does");
        let mut level = levels;
        loop {
            match make_unique(node, refs) {
                Node::Inner(children) => {
                    node = children[child_index(idx, level)]
                        .as_mut()
                        .expect("path exists");
                    level -= 1;
                }
                Node::Leaf(_) => return,
            }
        }
    }

    /// Set the entry at `idx`, returning the old one. Reference counts: the new slot gains a
    /// reference unless the old entry already held it; the old slot loses one otherwise.
    pub fn set(&mut self, idx: u32, entry: Entry, refs: &mut dyn SlotRefs) -> Option<Entry> {
        self.ensure_capacity(idx as u64 + 1);
        let levels = self.levels;
        let mut node = self
            .root
            .get_or_insert_with(|| Arc::new(empty_node(levels)));
        let mut level = levels;
        loop {
            match make_unique(node, refs) {
                Node::Inner(children) => {
                    let c = &mut children[child_index(idx, level)];
                    node = c.get_or_insert_with(|| Arc::new(empty_node(level - 1)));
                    level -= 1;
                }
                Node::Leaf(entries) => {
                    let key = child_index(idx, 1) as u8;
                    let old = match entries.binary_search_by_key(&key, |(k, _)| *k) {
                        Ok(i) => Some(std::mem::replace(&mut entries[i].1, entry)),
                        Err(i) => {
                            entries.insert(i, (key, entry));
                            None
                        }
                    };
                    match old {
                        Some(o) if o.slot == entry.slot => {
                            if o.present != entry.present {
                                refs.update(entry.slot, o.present, entry.present);
                            }
                        }
                        Some(o) => {
                            refs.incref(entry.slot, entry.present);
                            refs.decref(o.slot, o.present);
                        }
                        None => refs.incref(entry.slot, entry.present),
                    }
                    return old;
                }
            }
        }
    }

    /// Remove the entry at `idx` (decrementing its slot), pruning nodes left empty.
    pub fn remove(&mut self, idx: u32, refs: &mut dyn SlotRefs) -> Option<Entry> {
        self.get(idx)?;
        let levels = self.levels;
        let root = self.root.as_mut().expect("root exists when an entry does");
        let (old, empty) = remove_rec(root, levels, idx, refs);
        if empty {
            self.root = None;
        }
        if let Some(o) = old {
            refs.decref(o.slot, o.present);
        }
        old
    }

    /// Drop every entry at or above chunk index `from`.
    pub fn truncate(&mut self, from: u64, refs: &mut dyn SlotRefs) {
        let mut doomed = Vec::new();
        self.for_each_in(from, u64::MAX, |idx, _| doomed.push(idx));
        for idx in doomed {
            self.remove(idx, refs);
        }
    }

    /// Release the whole map (decrementing slots of leaves nobody else holds).
    pub fn release(self, refs: &mut dyn SlotRefs) {
        if let Some(root) = self.root {
            release_node(root, refs);
        }
    }

    /// Visit entries with `start <= idx < end` in ascending order.
    pub fn for_each_in(&self, start: u64, end: u64, mut f: impl FnMut(u32, Entry)) {
        self.try_for_each_in(start, end, |i, e| {
            f(i, e);
            ControlFlow::Continue(())
        });
    }

    /// Like [`Map::for_each_in`], stopping at the first `Break`.
    pub fn try_for_each_in(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(u32, Entry) -> ControlFlow<()>,
    ) {
        if let Some(root) = &self.root {
            let _ = walk(root, self.levels, 0, start, end, &mut f);
        }
    }

    /// Visit every node reachable from this map once per `seen` set.
    pub fn visit_nodes(&self, seen: &mut HashSet<*const Node>, f: &mut impl FnMut(&Arc<Node>)) {
        fn rec(n: &Arc<Node>, seen: &mut HashSet<*const Node>, f: &mut impl FnMut(&Arc<Node>)) {
            if !seen.insert(Arc::as_ptr(n)) {
                return;
            }
            if let Node::Inner(children) = &**n {
                for c in children.iter().flatten() {
                    rec(c, seen, f);
                }
            }
            f(n);
        }
        if let Some(root) = &self.root {
            rec(root, seen, f);
        }
    }
}

fn remove_rec(
    node: &mut Arc<Node>,
    level: u8,
    idx: u32,
    refs: &mut dyn SlotRefs,
) -> (Option<Entry>, bool) {
    match make_unique(node, refs) {
        Node::Inner(children) => {
            let ci = child_index(idx, level);
            let Some(child) = children[ci].as_mut() else {
                return (None, false);
            };
            let (old, empty) = remove_rec(child, level - 1, idx, refs);
            if empty {
                children[ci] = None;
            }
            (old, children.iter().all(Option::is_none))
        }
        Node::Leaf(entries) => {
            let key = child_index(idx, 1) as u8;
            let old = entries
                .binary_search_by_key(&key, |(k, _)| *k)
                .ok()
                .map(|i| entries.remove(i).1);
            (old, entries.is_empty())
        }
    }
}

fn walk(
    node: &Node,
    level: u8,
    base: u64,
    start: u64,
    end: u64,
    f: &mut impl FnMut(u32, Entry) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let span = 1u64 << (FAN_BITS * (level as u32 - 1));
    match node {
        Node::Inner(children) => {
            // Only the children that overlap [start, end): no scan from child 0.
            let first = (start.saturating_sub(base) / span).min(FAN as u64) as usize;
            let last = (end.saturating_sub(base).div_ceil(span)).min(FAN as u64) as usize;
            for (i, c) in children.iter().enumerate().take(last).skip(first) {
                if let Some(c) = c {
                    walk(c, level - 1, base + i as u64 * span, start, end, f)?;
                }
            }
        }
        Node::Leaf(entries) => {
            let lo = start.saturating_sub(base).min(FAN as u64) as usize;
            // Keys are distinct and sorted, so if the entry at position `lo` has key `lo`,
            // every key before it is smaller: a dense leaf needs no search (one cache miss
            // instead of a binary search's eight).
            let from = match entries.get(lo) {
                Some((k, _)) if *k as usize == lo => lo,
                _ => entries.partition_point(|(k, _)| (*k as usize) < lo),
            };
            for (k, e) in &entries[from..] {
                let idx = base + *k as u64;
                if idx >= end {
                    break;
                }
                f(idx as u32, *e)?;
            }
        }
    }
    ControlFlow::Continue(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Counts(HashMap<u32, i64>);
    impl SlotRefs for Counts {
        fn incref(&mut self, s: u32, _: u64) {
            *self.0.entry(s).or_default() += 1;
        }
        fn update(&mut self, _: u32, _: u64, _: u64) {}
        fn decref(&mut self, s: u32, _: u64) {
            let c = self.0.entry(s).or_default();
            *c -= 1;
            assert!(*c >= 0, "slot {s} refcount went negative");
            if *c == 0 {
                self.0.remove(&s);
            }
        }
    }

    fn e(slot: u32) -> Entry {
        Entry { slot, present: 1 }
    }

    #[test]
    fn set_get_remove() {
        let mut c = Counts::default();
        let mut m = Map::new(1 << 20);
        assert_eq!(m.levels(), 3);
        m.set(5, e(1), &mut c);
        m.set(70000, e(2), &mut c);
        assert_eq!(m.get(5), Some(e(1)));
        assert_eq!(m.get(70000), Some(e(2)));
        assert_eq!(m.get(6), None);
        assert_eq!(m.remove(5, &mut c), Some(e(1)));
        assert_eq!(c.0.get(&1), None);
        assert_eq!(c.0.get(&2), Some(&1));
        m.remove(70000, &mut c);
        assert!(m.root().is_none());
        assert!(c.0.is_empty());
    }

    #[test]
    fn clone_shares_and_cow_counts() {
        let mut c = Counts::default();
        let mut a = Map::new(1000);
        for i in 0..600 {
            a.set(i, e(i), &mut c);
        }
        let mut b = a.clone();
        // Shared leaves: each slot still referenced once.
        assert_eq!(c.0.get(&3), Some(&1));
        b.unshare_path(3, &mut c);
        // Leaf 0 (indices 0..256) copied: its slots now referenced twice, others once.
        assert_eq!(c.0.get(&3), Some(&2));
        assert_eq!(c.0.get(&300), Some(&1));
        b.set(3, e(9999), &mut c);
        assert_eq!(c.0.get(&3), Some(&1));
        assert_eq!(a.get(3), Some(e(3)));
        assert_eq!(b.get(3), Some(e(9999)));
        a.release(&mut c);
        assert_eq!(c.0.get(&3), None);
        assert_eq!(c.0.get(&300), Some(&1));
        b.release(&mut c);
        assert!(c.0.is_empty(), "leaked refs: {:?}", c.0.len());
    }

    #[test]
    fn grow_keeps_entries() {
        let mut c = Counts::default();
        let mut m = Map::new(10);
        assert_eq!(m.levels(), 1);
        m.set(7, e(7), &mut c);
        m.ensure_capacity(1 << 30);
        assert_eq!(m.levels(), 4);
        assert_eq!(m.get(7), Some(e(7)));
        m.set(u32::MAX, e(8), &mut c);
        let mut seen = Vec::new();
        m.for_each_in(0, u64::MAX, |i, _| seen.push(i));
        assert_eq!(seen, vec![7, u32::MAX]);
        m.truncate(8, &mut c);
        assert_eq!(m.get(u32::MAX), None);
        assert_eq!(c.0.len(), 1);
    }
}

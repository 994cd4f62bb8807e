//! Images: format inspection (pure, safe on hostile input) and conversion to raw: qcow2
//! in-process (imago), the other formats with `qemu-img` reading and writing store objects
//! through internal NBD exports.

pub mod convert;
pub mod inspect;
pub mod qcow2;
pub mod qcow2_out;

use uuid::Uuid;

use crate::store::Store;

/// The first `len` bytes of `object`, as a stream of pieces of at most 4 MiB read from the
/// store one after another (memory: one piece in flight).
pub fn object_stream(store: Store, object: Uuid, len: u64) -> admin_api::image::ByteStream {
    const PIECE: u64 = 4 << 20;
    Box::pin(futures_util::stream::unfold(0u64, move |at| {
        let store = store.clone();
        async move {
            if at >= len {
                return None;
            }
            let n = (len - at).min(PIECE);
            let piece = store
                .read(object, at, n as usize)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()));
            Some((piece, at + n))
        }
    }))
}

/// An object's bytes as the inspector reads them.
pub struct ObjectReader<'a> {
    store: &'a Store,
    object: Uuid,
    len: u64,
}

impl<'a> ObjectReader<'a> {
    /// The first `len` bytes of `object`.
    pub fn new(store: &'a Store, object: Uuid, len: u64) -> Self {
        ObjectReader { store, object, len }
    }
}

impl inspect::ReadAt for ObjectReader<'_> {
    fn size(&self) -> u64 {
        self.len
    }

    async fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        if offset >= self.len {
            return Ok(Vec::new());
        }
        let len = (len as u64).min(self.len - offset) as usize;
        self.store
            .read(self.object, offset, len)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

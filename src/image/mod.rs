//! Images: format inspection (pure, safe on hostile input) and conversion to raw: qcow2
//! in-process (imago), the other formats with `qemu-img` reading and writing store objects
//! through internal NBD exports.

pub mod convert;
pub mod inspect;
pub mod qcow2;
pub mod qcow2_out;

use uuid::Uuid;

use crate::store::Store;

/// The first `len` bytes of `object`, as a stream of pieces of at most 4 MiB. A task reads
/// ahead (two pieces), so the store's reads overlap whatever the consumer does with the
/// pieces (hashing, writing); memory stays at a few pieces.
pub fn object_stream(store: Store, object: Uuid, len: u64) -> admin_api::image::ByteStream {
    const PIECE: u64 = 4 << 20;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(2);
    tokio::spawn(async move {
        let mut at = 0;
        while at < len {
            let n = (len - at).min(PIECE);
            let piece = store
                .read(object, at, n as usize)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()));
            let failed = piece.is_err();
            if tx.send(piece).await.is_err() || failed {
                return;
            }
            at += n;
        }
    });
    receiver_stream(rx)
}

/// `file`'s bytes from where it stands, as a stream of pieces of at most 4 MiB (a task
/// reads ahead two pieces).
pub fn file_stream(file: std::fs::File) -> admin_api::image::ByteStream {
    use tokio::io::AsyncReadExt;
    const PIECE: usize = 4 << 20;
    let mut file = tokio::fs::File::from_std(file);
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(2);
    tokio::spawn(async move {
        loop {
            let mut buf = bytes::BytesMut::with_capacity(PIECE);
            let mut r = Ok(0);
            while buf.len() < PIECE {
                r = file.read_buf(&mut buf).await;
                if !matches!(r, Ok(n) if n > 0) {
                    break;
                }
            }
            let end = !matches!(r, Ok(n) if n > 0);
            let piece = match r {
                Err(e) => Err(e),
                Ok(_) if buf.is_empty() => return,
                Ok(_) => Ok(buf.freeze()),
            };
            let failed = piece.is_err();
            if tx.send(piece).await.is_err() || failed || end {
                return;
            }
        }
    });
    receiver_stream(rx)
}

/// The pieces a producer task sends, as a stream.
pub(crate) fn receiver_stream(
    rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
) -> admin_api::image::ByteStream {
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|piece| (piece, rx))
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

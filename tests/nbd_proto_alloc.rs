//! The NBD codec's memory bound, measured: a counting global allocator (per thread, so
//! parallel tests do not disturb each other) records the peak heap growth while a decoder
//! runs. Length fields that claim gigabytes must not turn into allocations; hostile streams
//! must stay within the documented limits (the option decoder's `max_payload`, the caller's
//! reply limit) plus what the decoded values themselves hold.
//!
//! Lives in its own test binary so the allocator does not wrap the library's unit tests.
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{BufMut, BytesMut};
use cairn::nbd::proto::*;
use proptest::prelude::*;

struct Counting;

thread_local! {
    static CUR: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = CUR.try_with(|c| {
        let v = c.get() + delta;
        c.set(v);
        let _ = PEAK.try_with(|p| {
            if v > p.get() {
                p.set(v)
            }
        });
    });
}

// SAFETY: forwards to the system allocator unchanged; the bookkeeping touches only
// const-initialised thread-locals without destructors (no allocation, no reentrancy).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            track(l.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            track(l.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        track(-(l.size() as isize));
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            // Old and new block may coexist during the copy.
            track(new as isize);
            track(-(l.size() as isize));
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`, returning its result and the peak heap growth (bytes) on this thread during it.
fn peak<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = CUR.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let top = PEAK.with(Cell::get);
    (r, (top - base).max(0) as usize)
}

fn opt_header(opt: u32, len: u32) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u64(IHAVEOPT);
    b.put_u32(opt);
    b.put_u32(len);
    b
}

#[test]
fn the_counter_counts() {
    let (v, p) = peak(|| vec![7u8; 100_000]);
    assert!(p >= 100_000, "{p}");
    drop(v);
    let (_, p) = peak(|| {
        let mut b = BytesMut::new();
        b.reserve(50_000);
    });
    assert!(p >= 50_000, "{p}");
}

#[test]
fn huge_length_fields_allocate_nothing() {
    // Options: unknown with 4 GiB of data (fatal), known above max_payload (skipped).
    let mut dec = OptionDecoder::default();
    let mut b = opt_header(99, u32::MAX);
    let (r, p) = peak(|| dec.decode(&mut b));
    assert!(matches!(r, Err(ProtoError::OptionTooLarge { .. })));
    assert!(p < 1024, "{p}");

    let mut dec = OptionDecoder::default();
    let mut b = opt_header(NBD_OPT_GO, dec.limits().max_payload + 1);
    let (r, p) = peak(|| dec.decode(&mut b));
    assert_eq!(r, Ok(None));
    assert!(p < 1024, "{p}");

    // A known option within max_payload reserves at most that much while it arrives.
    let mut dec = OptionDecoder::default();
    let max = dec.limits().max_payload as usize;
    let mut b = opt_header(NBD_OPT_GO, max as u32);
    let (r, p) = peak(|| dec.decode(&mut b));
    assert_eq!(r, Ok(None));
    assert!(p <= 2 * (max + OPTION_HEADER_LEN) + 1024, "{p}");

    // Meta context with 2^32-1 queries announced in 8 bytes of data.
    let limits = OptionLimits {
        max_queries: u32::MAX,
        ..OptionLimits::default()
    };
    let data = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
    let (r, p) = peak(|| OptionRequest::parse(Opt::SetMetaContext, &data, &limits));
    assert!(r.is_err());
    assert!(p < 1024, "{p}");

    // Requests: a 2^63-byte WRITE payload, compact and extended.
    let mut b = BytesMut::new();
    b.put_u32(NBD_EXTENDED_REQUEST_MAGIC);
    b.put_u16(NBD_CMD_FLAG_PAYLOAD_LEN);
    b.put_u16(NBD_CMD_WRITE);
    b.put_u64(1);
    b.put_u64(0);
    b.put_u64(1 << 63);
    let (r, p) = peak(|| decode_request(&mut b, HeaderMode::Extended, 1 << 25));
    assert!(r.is_err());
    assert!(p < 1024, "{p}");

    // Replies (client side): a 2^60-byte chunk; and one within the limit not yet arrived.
    for len in [1u64 << 60, 1 << 20] {
        let mut b = BytesMut::new();
        b.put_u32(NBD_EXTENDED_REPLY_MAGIC);
        b.put_u16(0);
        b.put_u16(NBD_REPLY_TYPE_OFFSET_DATA);
        b.put_u64(1);
        b.put_u64(0);
        b.put_u64(len);
        let (_, p) = peak(|| decode_reply(&mut b, HeaderMode::Extended, 1 << 20));
        assert!(p < 1024, "{p}");
    }

    // Option replies (client side): 4 GiB claimed.
    let mut b = BytesMut::new();
    b.put_u64(NBD_OPT_REPLY_MAGIC);
    b.put_u32(NBD_OPT_GO);
    b.put_u32(NBD_REP_INFO);
    b.put_u32(u32::MAX);
    let (r, p) = peak(|| OptionReply::decode(&mut b, 1 << 16));
    assert!(r.is_err());
    assert!(p < 1024, "{p}");
}

fn hostile_stream() -> impl Strategy<Value = Vec<u8>> {
    let seg = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..48),
        // Headers with the right magic and arbitrary (often huge) lengths.
        (any::<u32>(), any::<u32>()).prop_map(|(o, l)| opt_header(o % 16, l).to_vec()),
        (any::<u16>(), any::<u16>(), any::<u64>()).prop_map(|(f, c, l)| {
            let mut b = BytesMut::new();
            b.put_u32(NBD_EXTENDED_REQUEST_MAGIC);
            b.put_u16(f);
            b.put_u16(c);
            b.put_u64(0);
            b.put_u64(0);
            b.put_u64(l);
            b.to_vec()
        }),
        (any::<u16>(), any::<u32>()).prop_map(|(t, l)| {
            let mut b = BytesMut::new();
            b.put_u32(NBD_STRUCTURED_REPLY_MAGIC);
            b.put_u16(0);
            b.put_u16(t);
            b.put_u64(0);
            b.put_u32(l);
            b.to_vec()
        }),
        (any::<u32>(), any::<u32>()).prop_map(|(t, l)| {
            let mut b = BytesMut::new();
            b.put_u64(NBD_OPT_REPLY_MAGIC);
            b.put_u32(1);
            b.put_u32(t);
            b.put_u32(l);
            b.to_vec()
        }),
    ];
    proptest::collection::vec(seg, 0..12).prop_map(|v| v.concat())
}

/// Feeds `stream` in pieces; `step` measures each decode call and returns false when fatal.
fn feed(stream: &[u8], piece: usize, mut step: impl FnMut(&mut BytesMut) -> bool) {
    let mut buf = BytesMut::with_capacity(4096);
    for p in stream.chunks(piece.max(1)) {
        buf.extend_from_slice(p);
        if !step(&mut buf) {
            return;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn option_decoder_stays_within_max_payload(stream in hostile_stream(), piece in 1usize..100,
                                               max_payload in 0u32..4096) {
        let limits = OptionLimits { max_payload, max_skip: 1 << 20, max_queries: 64 };
        let mut dec = OptionDecoder::new(limits);
        let bound = 2 * (max_payload as usize + OPTION_HEADER_LEN) + 2 * stream.len() + 4096;
        feed(&stream, piece, |buf| loop {
            let (r, p) = peak(|| dec.decode(buf));
            assert!(p <= bound, "peak {p} > {bound}");
            match r {
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(_) => return false,
            }
        });
    }

    #[test]
    fn request_decoder_allocates_nothing(stream in hostile_stream(), piece in 1usize..100) {
        for mode in [HeaderMode::Compact, HeaderMode::Extended] {
            let mut skip = 0usize;
            feed(&stream, piece, |buf| loop {
                let n = skip.min(buf.len());
                bytes::Buf::advance(buf, n);
                skip -= n;
                if skip > 0 {
                    return true;
                }
                let (r, p) = peak(|| decode_request(buf, mode, 1 << 25));
                assert_eq!(p, 0);
                match r {
                    Ok(Some(req)) => skip = req.payload_len(mode) as usize,
                    Ok(None) => return true,
                    Err(_) => return false,
                }
            });
        }
    }

    #[test]
    fn reply_decoders_stay_within_their_limit(stream in hostile_stream(), piece in 1usize..100) {
        for mode in [HeaderMode::Compact, HeaderMode::Extended] {
            feed(&stream, piece, |buf| loop {
                let (r, p) = peak(|| {
                    decode_reply(buf, mode, 4096).map(|o| o.map(|r| {
                        let body = match &r {
                            Reply::Chunk(c) => Some(c.body()),
                            Reply::Simple { .. } => None,
                        };
                        (r, body)
                    }))
                });
                assert!(p <= 4096 * 3 + 1024, "peak {p}");
                match r {
                    Ok(Some(_)) => {}
                    Ok(None) => return true,
                    Err(_) => return false,
                }
            });
        }
        feed(&stream, piece, |buf| loop {
            let (r, p) = peak(|| OptionReply::decode(buf, 4096));
            assert!(p <= 4096 * 3 + 1024, "peak {p}");
            match r {
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(_) => return false,
            }
        });
    }
}

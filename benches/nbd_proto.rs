//! Criterion micro-benchmarks of the NBD wire codec (`cairn::nbd::proto`): request header
//! decode from a receive buffer (1024 pipelined 4 KiB READs per iteration, compact and
//! extended headers) and reply header encode (simple reply, OFFSET_DATA chunk header in both
//! modes, 1024 per iteration). These are the per-request CPU costs of the NBD reader and
//! writer tasks, apart from I/O; throughput is reported in requests per second.
use std::hint::black_box;

use bytes::{BufMut, BytesMut};
use cairn::nbd::proto::{
    Command, Errno, HeaderMode, NBD_CMD_FLAG_FUA, Request, decode_request, simple_reply,
};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const N: u64 = 1024;

fn pipelined_reads(mode: HeaderMode) -> BytesMut {
    let mut b = BytesMut::with_capacity(N as usize * mode.request_len());
    for i in 0..N {
        let r = Request {
            flags: 0,
            command: Command::Read,
            cookie: i,
            offset: i * 4096,
            length: 4096,
        };
        b.put_slice(&r.encode(mode).expect("4 KiB fits"));
    }
    b
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_proto/decode_request");
    g.throughput(Throughput::Elements(N));
    for (name, mode) in [
        ("compact", HeaderMode::Compact),
        ("extended", HeaderMode::Extended),
    ] {
        let wire = pipelined_reads(mode);
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || wire.clone(),
                |buf| {
                    let mut n = 0u64;
                    while let Ok(Some(r)) = decode_request(buf, mode, 1 << 25) {
                        n = n.wrapping_add(r.cookie);
                    }
                    black_box(n)
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_proto/encode_reply_header");
    g.throughput(Throughput::Elements(N));
    let mut out = BytesMut::with_capacity(64 * N as usize);
    g.bench_function("simple", |b| {
        b.iter(|| {
            out.clear();
            for i in 0..N {
                let err = if i % 64 == 0 { Some(Errno::Io) } else { None };
                out.put_slice(&simple_reply(black_box(i), err));
            }
            black_box(out.len())
        })
    });
    for (name, mode) in [
        ("offset_data_compact", HeaderMode::Compact),
        ("offset_data_extended", HeaderMode::Extended),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                for i in 0..N {
                    let req = Request {
                        flags: NBD_CMD_FLAG_FUA,
                        command: Command::Read,
                        cookie: black_box(i),
                        offset: i * 4096,
                        length: 4096,
                    };
                    let h = req
                        .reply_to(mode)
                        .offset_data(true, req.offset, 4096)
                        .expect("4 KiB fits");
                    out.put_slice(&h);
                }
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);

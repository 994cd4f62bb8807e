//! The NBD server against a hand-driven client built on `cairn::nbd::proto`: handshake
//! corners (unknown options, STARTTLS, LIST, GO) and transmission without structured replies
//! (the Linux kernel client's mode), including requests the server must refuse while the
//! connection goes on, and a payload too large to read, which ends it.

mod common;

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    time::Duration,
};

use bytes::BytesMut;
use cairn::nbd::proto::*;
use common::{Serve, run_cairn};

struct Client {
    s: UnixStream,
    buf: BytesMut,
}

impl Client {
    fn more(&mut self) -> usize {
        let mut tmp = [0u8; 65536];
        let n = self.s.read(&mut tmp).expect("read (timed out?)");
        self.buf.extend_from_slice(&tmp[..n]);
        n
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("write");
    }

    fn option(&mut self, req: &OptionRequest) {
        let mut out = BytesMut::new();
        req.encode(&mut out).expect("encode option");
        self.send(&out);
    }

    fn reply(&mut self) -> (Opt, OptionReply) {
        loop {
            if let Some(r) = OptionReply::decode(&mut self.buf, 1 << 20).expect("option reply") {
                return r;
            }
            assert!(self.more() > 0, "server closed during the handshake");
        }
    }

    /// The next option reply is the error `want` (negotiation goes on).
    fn expect_error(&mut self, want: RepError) {
        let (_, rep) = self.reply();
        assert!(
            matches!(&rep, OptionReply::Error { error, .. } if *error == want),
            "{rep:?}"
        );
    }

    fn request(&mut self, command: Command, cookie: u64, offset: u64, length: u64, data: &[u8]) {
        let req = Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        };
        self.send(&req.encode(HeaderMode::Compact).expect("encode request"));
        self.send(data);
    }

    /// A simple reply: (cookie, error).
    fn simple(&mut self) -> (u64, u32) {
        loop {
            if let Some(r) =
                decode_reply(&mut self.buf, HeaderMode::Compact, 1 << 20).expect("reply")
            {
                match r {
                    Reply::Simple { cookie, error } => return (cookie, error),
                    other => panic!("structured reply without negotiation: {other:?}"),
                }
            }
            assert!(self.more() > 0, "server closed the connection");
        }
    }

    fn data(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.more() > 0, "server closed mid-data");
        }
        self.buf.split_to(n).to_vec()
    }
}

#[test]
fn handshake_corners_and_simple_replies() {
    let c = Serve::new().arg("--admin-password").arg("pw").start();
    let id = attached_volume(&c);
    let mut cl = Client::connect(&c.data_dir().join("nbd.sock"));

    // Unknown option: NBD_REP_ERR_UNSUP, and negotiation goes on.
    let mut out = BytesMut::new();
    encode_option_raw(&mut out, 0x4242, b"whatever").expect("raw option");
    cl.send(&out);
    let (opt, rep) = cl.reply();
    assert_eq!(opt, Opt::Unknown(0x4242));
    assert!(
        matches!(
            rep,
            OptionReply::Error {
                error: RepError::Unsup,
                ..
            }
        ),
        "{rep:?}"
    );

    cl.option(&OptionRequest::StartTls);
    cl.expect_error(RepError::Policy);

    // Malformed LIST (it takes no data): NBD_REP_ERR_INVALID, still negotiating.
    let mut out = BytesMut::new();
    encode_option_raw(&mut out, NBD_OPT_LIST, b"x").expect("raw option");
    cl.send(&out);
    cl.expect_error(RepError::Invalid);

    cl.option(&OptionRequest::List);
    let mut names = Vec::new();
    loop {
        match cl.reply() {
            (Opt::List, OptionReply::Server { name, .. }) => names.push(name),
            (Opt::List, OptionReply::Ack) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(names, vec![id.clone()]);

    // Unknown export in GO: an error, not a dropped connection.
    cl.option(&OptionRequest::Go(InfoRequest {
        name: "nope".into(),
        requests: vec![],
    }));
    cl.expect_error(RepError::UnknownExport);

    cl.option(&OptionRequest::Go(InfoRequest {
        name: id.clone(),
        requests: vec![InfoType::Name, InfoType::BlockSize],
    }));
    let mut size = None;
    loop {
        match cl.reply() {
            (Opt::Go, OptionReply::Info(Info::Export { size: s, flags })) => {
                assert_ne!(flags & NBD_FLAG_CAN_MULTI_CONN, 0);
                assert_eq!(flags & NBD_FLAG_SEND_DF, 0, "DF without structured replies");
                size = Some(s);
            }
            (Opt::Go, OptionReply::Info(_)) => {}
            (Opt::Go, OptionReply::Ack) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let size = size.expect("NBD_INFO_EXPORT");
    assert_eq!(size, 1 << 30);

    // Transmission, simple replies only.
    cl.request(Command::Unknown(42), 1, 0, 0, &[]);
    assert_eq!(cl.simple(), (1, NBD_EINVAL));
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    cl.request(Command::Write, 2, 12288, 8192, &pattern);
    assert_eq!(cl.simple(), (2, 0));
    cl.request(Command::Read, 3, 12288, 8192, &[]);
    assert_eq!(cl.simple(), (3, 0));
    assert_eq!(cl.data(8192), pattern);
    cl.request(Command::Read, 4, size - 4096, 8192, &[]);
    assert_eq!(cl.simple(), (4, NBD_EINVAL));
    // Refused write: its payload is consumed, the next request parses.
    cl.request(Command::Write, 5, size - 1, 4096, &[0xee; 4096]);
    assert_eq!(cl.simple(), (5, NBD_ENOSPC));
    // Reads longer than the advertised maximum are refused without being attempted.
    cl.request(Command::Read, 6, 0, 64 << 20, &[]);
    assert_eq!(cl.simple(), (6, NBD_EINVAL));
    cl.request(Command::Flush, 7, 0, 0, &[]);
    assert_eq!(cl.simple(), (7, 0));
    cl.request(Command::Read, 8, 12288, 4096, &[]);
    assert_eq!(cl.simple(), (8, 0));
    assert_eq!(cl.data(4096), &pattern[..4096]);

    // A payload above the 32 MiB limit is not read: the server ends the connection. Requests
    // that arrived in the same write before it (started together, as a group) are still
    // answered first.
    let mut burst = Vec::new();
    for k in 0..4u64 {
        let req = Request {
            flags: 0,
            command: Command::Read,
            cookie: 10 + k,
            offset: 12288 + k * 1024,
            length: 1024,
        };
        burst.extend_from_slice(&req.encode(HeaderMode::Compact).expect("encode request"));
    }
    let fatal = Request {
        flags: 0,
        command: Command::Write,
        cookie: 9,
        offset: 0,
        length: 64 << 20,
    };
    burst.extend_from_slice(&fatal.encode(HeaderMode::Compact).expect("encode request"));
    cl.send(&burst);
    let mut answered = Vec::new();
    for _ in 0..4 {
        let (cookie, error) = cl.simple();
        assert_eq!(error, 0, "request {cookie}");
        let k = (cookie - 10) as usize;
        assert_eq!(cl.data(1024), &pattern[k * 1024..(k + 1) * 1024]);
        answered.push(cookie);
    }
    answered.sort();
    assert_eq!(answered, [10, 11, 12, 13]);
    let mut tmp = [0u8; 4096];
    match cl.s.read(&mut tmp) {
        Ok(0) => {}
        Ok(_) => panic!("no reply expected"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected EOF, got {e}"),
    }
}

/// Extended-header corners: STRUCTURED_REPLY after EXTENDED_HEADERS is refused with
/// NBD_REP_ERR_EXT_HEADER_REQD; a meta context selected for another export is no selection
/// (BLOCK_STATUS gets EINVAL); a read above the maximum payload gets EOVERFLOW.
#[test]
fn extended_header_corners() {
    let c = Serve::new().arg("--admin-password").arg("pw").start();
    let a = attached_volume(&c);
    let b = attached_volume(&c);
    let mut cl = Client::connect(&c.data_dir().join("nbd.sock"));

    cl.option(&OptionRequest::ExtendedHeaders);
    assert!(matches!(
        cl.reply(),
        (Opt::ExtendedHeaders, OptionReply::Ack)
    ));
    cl.option(&OptionRequest::StructuredReply);
    cl.expect_error(RepError::ExtHeaderReqd);

    // base:allocation selected for volume b, then volume a opened.
    cl.option(&OptionRequest::SetMetaContext(MetaContextRequest {
        name: b,
        queries: vec!["base:allocation".into()],
    }));
    assert!(matches!(cl.reply(), (_, OptionReply::MetaContext { .. })));
    assert!(matches!(cl.reply(), (_, OptionReply::Ack)));
    cl.option(&OptionRequest::Go(InfoRequest {
        name: a,
        requests: vec![],
    }));
    while !matches!(cl.reply(), (Opt::Go, OptionReply::Ack)) {}

    let send = |cl: &mut Client, command, cookie, length| {
        let req = Request {
            flags: 0,
            command,
            cookie,
            offset: 0,
            length,
        };
        cl.send(&req.encode(HeaderMode::Extended).expect("encode request"));
    };
    send(&mut cl, Command::BlockStatus, 1, 1 << 20);
    assert_eq!(cl.error_chunk(1), NBD_EINVAL);
    send(&mut cl, Command::Read, 2, 64 << 20);
    assert_eq!(cl.error_chunk(2), NBD_EOVERFLOW);
    // The connection goes on.
    send(&mut cl, Command::Read, 3, 4096);
    let chunk = cl.chunk();
    assert_eq!((chunk.cookie, chunk.ty), (3, ReplyType::OffsetData));
}

/// SET_META_CONTEXT replaces the selection "including when this command fails": after a
/// good SET, a malformed one (a byte of trailing data) is refused and leaves nothing
/// selected, so BLOCK_STATUS gets EINVAL.
#[test]
fn a_failed_set_meta_context_clears_the_selection() {
    let c = Serve::new().arg("--admin-password").arg("pw").start();
    let a = attached_volume(&c);
    let mut cl = Client::connect(&c.data_dir().join("nbd.sock"));
    cl.option(&OptionRequest::ExtendedHeaders);
    assert!(matches!(
        cl.reply(),
        (Opt::ExtendedHeaders, OptionReply::Ack)
    ));
    let set = OptionRequest::SetMetaContext(MetaContextRequest {
        name: a.clone(),
        queries: vec!["base:allocation".into()],
    });
    cl.option(&set);
    assert!(matches!(cl.reply(), (_, OptionReply::MetaContext { .. })));
    assert!(matches!(cl.reply(), (_, OptionReply::Ack)));
    // The same option with one byte more than its queries.
    let mut bad = BytesMut::new();
    set.encode(&mut bad).expect("encode option");
    let len = u32::from_be_bytes(bad[12..16].try_into().expect("4 bytes")) + 1;
    bad[12..16].copy_from_slice(&len.to_be_bytes());
    bad.extend_from_slice(b"X");
    cl.send(&bad);
    cl.expect_error(RepError::Invalid);
    cl.option(&OptionRequest::Go(InfoRequest {
        name: a,
        requests: vec![],
    }));
    while !matches!(cl.reply(), (Opt::Go, OptionReply::Ack)) {}
    let req = Request {
        flags: 0,
        command: Command::BlockStatus,
        cookie: 1,
        offset: 0,
        length: 1 << 20,
    };
    cl.send(&req.encode(HeaderMode::Extended).expect("encode request"));
    assert_eq!(cl.error_chunk(1), NBD_EINVAL);
}

impl Client {
    /// The next reply in extended mode, which must be a chunk.
    fn chunk(&mut self) -> Chunk {
        loop {
            if let Some(r) =
                decode_reply(&mut self.buf, HeaderMode::Extended, 1 << 26).expect("reply")
            {
                match r {
                    Reply::Chunk(c) => return c,
                    other => panic!("simple reply in extended mode: {other:?}"),
                }
            }
            assert!(self.more() > 0, "server closed the connection");
        }
    }

    /// The next reply is a final error chunk for `cookie`: its error value.
    fn error_chunk(&mut self, cookie: u64) -> u32 {
        let c = self.chunk();
        assert_eq!(c.cookie, cookie);
        assert!(c.is_done(), "{c:?}");
        match c.body().expect("chunk body") {
            ChunkBody::Error { error, .. } => error,
            other => panic!("expected an error chunk, got {other:?}"),
        }
    }
}

/// SIGTERM with a read in flight (its reply larger than the socket buffers, the client not
/// reading): requests received after that are answered with NBD_ESHUTDOWN, the read still
/// gets its data, then the connection closes and the daemon exits cleanly.
#[test]
fn shutdown_answers_later_requests_with_eshutdown() {
    let mut c = Serve::new()
        .arg("--admin-password")
        .arg("pw")
        .env("CAIRN_LOG_LEVEL", "info,cairn::nbd=debug")
        .start();
    let id = attached_volume(&c);
    let mut cl = Client::connect(&c.data_dir().join("nbd.sock"));
    cl.option(&OptionRequest::Go(InfoRequest {
        name: id,
        requests: vec![],
    }));
    while !matches!(cl.reply(), (Opt::Go, OptionReply::Ack)) {}
    let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    cl.request(Command::Write, 1, 0, pattern.len() as u64, &pattern);
    assert_eq!(cl.simple(), (1, 0));

    let len = 16usize << 20;
    cl.request(Command::Read, 2, 0, len as u64, &[]);
    // Its reply has begun: the read is in flight until the client drains it.
    assert_eq!(cl.simple(), (2, 0));
    c.signal(libc::SIGTERM);
    assert!(
        c.logs
            .wait_for(Duration::from_secs(30), |l| l
                .contains("further requests get ESHUTDOWN"))
            .is_some(),
        "{}",
        c.logs.text()
    );
    cl.request(Command::Flush, 3, 0, 0, &[]);
    let data = cl.data(len);
    assert_eq!(&data[..pattern.len()], &pattern[..]);
    assert!(data[pattern.len()..].iter().all(|&b| b == 0));
    assert_eq!(cl.simple(), (3, NBD_ESHUTDOWN));
    assert_eq!(
        cl.more(),
        0,
        "the connection closes once nothing is in flight"
    );
    let status = c.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status:?}\n{}", c.logs.text());
}

/// A fresh 1 GiB volume attached to server `vm` through the CLI: its id (the export name).
fn attached_volume(c: &common::Cairn) -> String {
    let data = c.data_dir().to_str().expect("utf8").to_owned();
    let (ok, out, err) = run_cairn(&[
        "volume",
        "create",
        "--size",
        "1G",
        "--attach",
        "vm",
        "--data-dir",
        &data,
    ]);
    assert!(ok.success(), "{err}");
    out.trim().rsplit('/').next().expect("uuid").to_owned()
}

impl Client {
    /// Connect to the unix socket and send the client flags (fixed newstyle, no zeroes).
    fn connect(sock: &std::path::Path) -> Client {
        let s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut cl = Client {
            s,
            buf: BytesMut::new(),
        };
        let flags = loop {
            if let Some(f) = decode_greeting(&mut cl.buf).expect("greeting") {
                break f;
            }
            assert!(cl.more() > 0, "server closed before its greeting");
        };
        assert_eq!(flags, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        let cf = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        };
        cl.send(&cf.encode());
        cl
    }
}

/// `--nbd-handshake-timeout`: a client that stalls in the handshake is disconnected, while a
/// connection that finished its handshake before it (and so has been in transmission for
/// longer than the timeout) keeps being served.
#[test]
fn stalled_handshake_is_disconnected_transmission_is_not() {
    let c = Serve::new()
        .arg("--admin-password")
        .arg("pw")
        .arg("--nbd-handshake-timeout")
        .arg("1")
        .start();
    let id = attached_volume(&c);
    let sock = c.data_dir().join("nbd.sock");

    let mut busy = Client::connect(&sock);
    busy.option(&OptionRequest::Go(InfoRequest {
        name: id,
        requests: vec![],
    }));
    loop {
        match busy.reply() {
            (Opt::Go, OptionReply::Ack) => break,
            (Opt::Go, OptionReply::Info(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    // Greeting read, client flags sent, then nothing: the server must hang up.
    let mut idle = Client::connect(&sock);
    // Well past 1 s, well short of the 30 s default: fails if the flag is not applied.
    idle.s
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut rest = Vec::new();
    let n = idle
        .s
        .read_to_end(&mut rest)
        .expect("EOF from the server (a read timeout means it never hung up)");
    assert_eq!(n, 0, "no option was sent, so nothing may come back");

    // The earlier connection outlived the timeout in transmission and still works.
    busy.request(Command::Write, 1, 0, 4096, &[0x5a; 4096]);
    assert_eq!(busy.simple(), (1, 0));
    busy.request(Command::Read, 2, 0, 4096, &[]);
    assert_eq!(busy.simple(), (2, 0));
    assert_eq!(busy.data(4096), vec![0x5a; 4096]);
}

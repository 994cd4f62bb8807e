//! The NBD wire codec: pure encoders and decoders for both ends of the protocol, no I/O.
//!
//! The contract is the NBD spec, `doc/proto.md` of NetworkBlockDevice/nbd (master), plus the
//! extended-headers extension (branch `extension-ext-header`, which also holds everything of
//! master that this module uses). Names of constants are the spec's, so they can be grepped in
//! both.
//!
//! # Shape
//!
//! - **Decoders** take `&mut BytesMut` (the reader task's receive buffer) and return
//!   `Ok(None)` when more bytes are needed, consuming nothing; on success they consume exactly
//!   what they return. A request decoder consumes only the header: the WRITE payload stays in
//!   the buffer, its length is [`Request::payload_len`], and the reader takes it with
//!   `buf.split_to(n).freeze()` (zero copy) once it has arrived.
//! - **Hot-path encoders** (request header, simple reply, chunk headers with their fixed
//!   payload headers) return a [`HeaderBuf`]: a fixed 48-byte array, no allocation, meant to be
//!   the first `IoSlice` of a vectored write whose second slice is the data `Bytes`. Messages
//!   with a variable-length body that is not bulk data (error chunks, block status, option
//!   replies) are appended to a `BytesMut`.
//! - The handshake is decoded by [`OptionDecoder`], a small state machine that also skips
//!   payloads it will not buffer, so the handshake shares the one receive buffer with the
//!   transmission phase (bytes after `NBD_OPT_GO` stay in the buffer).
//!
//! # Errors: who does what
//!
//! - [`ProtoError`]: framing is lost or the peer broke a rule the spec answers with a hard
//!   disconnect (bad magic, unknown client flags, a length too large to read or skip). Drop the
//!   connection.
//! - [`OptionError`] (inside [`OptionEvent::Rejected`]): the option was consumed in full but is
//!   malformed or too big. Answer it with [`OptionError::rep_error`] (`NBD_REP_ERR_INVALID` or
//!   `NBD_REP_ERR_TOO_BIG`) plus the error's text as message, and keep negotiating. Exception:
//!   a rejected `NBD_OPT_EXPORT_NAME` cannot be answered, the server must disconnect.
//! - [`InvalidRequest`]: the request header is well framed but the request is not acceptable
//!   (unknown command or flag, command not advertised, read-only export). Consume its payload,
//!   reply with [`InvalidRequest::errno`], keep serving.
//! - [`EncodeError`]: the caller asked for something the wire cannot express (a bug).
//!
//! # Spec corners the server must handle (not decidable here)
//!
//! - `NBD_OPT_EXPORT_NAME` cannot fail: unknown export or a rejected name -> disconnect; its
//!   reply has 124 zero bytes unless the client set `NBD_FLAG_C_NO_ZEROES`. No zeroes ever
//!   follow the ACK of `NBD_OPT_GO`. After `NBD_OPT_EXTENDED_HEADERS` was acked, the client
//!   must not use EXPORT_NAME and GO must not fail with `NBD_REP_ERR_UNSUP`.
//! - INFO/GO success: at least `Info::Export`, then `Ack`; info types not understood are
//!   ignored. SET_META_CONTEXT replaces the previous selection even when it fails, is only
//!   valid after structured replies or extended headers (else `NBD_REP_ERR_INVALID`), and
//!   `base:` with an empty leaf selects nothing (in LIST it is a wildcard).
//! - `NBD_OPT_STARTTLS` forgets every negotiated state; bytes already in the receive buffer
//!   then belong to the TLS layer.
//! - Reply shape: without structured replies only simple replies; with them READ MUST use
//!   chunks (even for an early EINVAL), other replies without payload may be simple; with
//!   extended headers only extended chunks. BLOCK_STATUS: one chunk per selected context,
//!   `NBD_REPLY_TYPE_BLOCK_STATUS` in compact mode and `_EXT` in extended mode
//!   ([`ReplyTo::block_status`] picks by mode); EINVAL if no context was selected.
//! - A simple READ reply cannot report an error after its header went out: disconnect.
//! - A rejected request still has its payload on the wire: consume it, then reply.
//!
//! # Hardening
//!
//! Every decoder works on untrusted input: no `unwrap`, `expect` or indexing that input can
//! make panic (fixed-size reads go through `split_first_chunk`), and no allocation sized by a
//! length field before that many bytes have arrived, except [`OptionDecoder`]'s
//! `reserve` of at most [`OptionLimits::max_payload`]. cargo-fuzz needs a nightly toolchain,
//! which the build machines do not have, so property tests are the fuzzing: arbitrary byte
//! streams, split at arbitrary points, go through every decoder (unit tests below), and
//! `tests/nbd_proto_alloc.rs` measures the peak heap use of each decoder on such streams
//! with a counting allocator.
use std::fmt;
use std::io;
use std::ops::Deref;

use bytes::{Buf, BufMut, Bytes, BytesMut};

// ---------------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second 8 bytes of the newstyle greeting, and the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub const NBD_OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Compact (28-byte) request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended (32-byte) request.
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple (16-byte) reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured (20-byte) reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended (32-byte) reply chunk.
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (16 bits, server -> client).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (32 bits, client -> server).
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Option codes.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
/// Withdrawn (`PEEK_EXPORT` extension); decoded as [`Opt::Unknown`].
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an error reply.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR | 10;

// NBD_REP_INFO information types.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags (16 bits).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Only with structured replies or extended headers negotiated.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `RESIZE` extension.
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Requires `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Only with extended headers negotiated.
pub const NBD_FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// Commands.
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// `RESIZE` extension.
pub const NBD_CMD_RESIZE: u16 = 8;

// Command flags (16 bits).
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers only: the length field is a payload length.
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured / extended reply flags.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

// Structured / extended reply types.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit 15 marks an error chunk (not a spec name; the spec says "all error chunk types have
/// bit 15 set").
pub const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT | 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

// Error values of the transmission phase.
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// `base:allocation` status flags.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// The one metadata context the spec defines.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Strings (export names, queries, messages) MUST be no longer than this.
pub const NBD_MAX_STRING: usize = 4096;
/// The spec's default maximum payload (2^25): no payload up to this size is to be treated as
/// a denial of service, whatever was advertised.
pub const NBD_DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;
/// Servers SHOULD NOT send more block status descriptors than this in one chunk; the encoder
/// refuses to.
pub const NBD_MAX_EXTENTS: usize = 1 << 20;

// Wire sizes.
pub const GREETING_LEN: usize = 18;
pub const CLIENT_FLAGS_LEN: usize = 4;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// `NBD_OPT_EXPORT_NAME` reply without / with the 124 zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
pub const EXPORT_NAME_ZEROES: usize = 124;
pub const COMPACT_REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_CHUNK_LEN: usize = 20;
pub const EXTENDED_CHUNK_LEN: usize = 32;

// ---------------------------------------------------------------------------------------------
// Typed codes
// ---------------------------------------------------------------------------------------------

/// A wire code as a typed enum with an `Unknown` arm, so that every value is representable.
/// `from_raw` never produces `Unknown` for a value that has a named arm.
macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident: $raw:ty {
        $($(#[$vm:meta])* $variant:ident = $value:path,)*
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $variant,)*
            /// A value without a named arm (as received; kept for replies and logs).
            Unknown($raw),
        }

        impl $name {
            pub const fn from_raw(v: $raw) -> Self {
                match v {
                    $($value => Self::$variant,)*
                    other => Self::Unknown(other),
                }
            }

            pub const fn to_raw(self) -> $raw {
                match self {
                    $(Self::$variant => $value,)*
                    Self::Unknown(v) => v,
                }
            }

            /// The spec's name, or `None` for an unknown value.
            pub const fn spec_name(self) -> Option<&'static str> {
                match self {
                    $(Self::$variant => Some(stringify!($value)),)*
                    Self::Unknown(_) => None,
                }
            }
        }

        impl From<$raw> for $name {
            fn from(v: $raw) -> Self {
                Self::from_raw(v)
            }
        }

        impl From<$name> for $raw {
            fn from(v: $name) -> Self {
                v.to_raw()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.spec_name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "unknown {} {:#x}", stringify!($name), self.to_raw()),
                }
            }
        }
    };
}

wire_enum! {
    /// An option code of the handshake (`NBD_OPT_*`).
    Opt: u32 {
        ExportName = NBD_OPT_EXPORT_NAME,
        Abort = NBD_OPT_ABORT,
        List = NBD_OPT_LIST,
        StartTls = NBD_OPT_STARTTLS,
        Info = NBD_OPT_INFO,
        Go = NBD_OPT_GO,
        StructuredReply = NBD_OPT_STRUCTURED_REPLY,
        ListMetaContext = NBD_OPT_LIST_META_CONTEXT,
        SetMetaContext = NBD_OPT_SET_META_CONTEXT,
        ExtendedHeaders = NBD_OPT_EXTENDED_HEADERS,
    }
}

wire_enum! {
    /// An error reply type of the handshake (`NBD_REP_ERR_*`). `Unknown` holds the whole
    /// 32-bit value, bit 31 included.
    RepError: u32 {
        Unsup = NBD_REP_ERR_UNSUP,
        Policy = NBD_REP_ERR_POLICY,
        Invalid = NBD_REP_ERR_INVALID,
        Platform = NBD_REP_ERR_PLATFORM,
        TlsReqd = NBD_REP_ERR_TLS_REQD,
        /// `NBD_REP_ERR_UNKNOWN`: the export does not exist.
        UnknownExport = NBD_REP_ERR_UNKNOWN,
        Shutdown = NBD_REP_ERR_SHUTDOWN,
        BlockSizeReqd = NBD_REP_ERR_BLOCK_SIZE_REQD,
        TooBig = NBD_REP_ERR_TOO_BIG,
        ExtHeaderReqd = NBD_REP_ERR_EXT_HEADER_REQD,
    }
}

wire_enum! {
    /// An information type of `NBD_REP_INFO` / an information request of INFO and GO.
    InfoType: u16 {
        Export = NBD_INFO_EXPORT,
        Name = NBD_INFO_NAME,
        Description = NBD_INFO_DESCRIPTION,
        BlockSize = NBD_INFO_BLOCK_SIZE,
    }
}

wire_enum! {
    /// A transmission command (`NBD_CMD_*`).
    Command: u16 {
        Read = NBD_CMD_READ,
        Write = NBD_CMD_WRITE,
        Disc = NBD_CMD_DISC,
        Flush = NBD_CMD_FLUSH,
        Trim = NBD_CMD_TRIM,
        Cache = NBD_CMD_CACHE,
        WriteZeroes = NBD_CMD_WRITE_ZEROES,
        BlockStatus = NBD_CMD_BLOCK_STATUS,
        Resize = NBD_CMD_RESIZE,
    }
}

wire_enum! {
    /// A structured / extended reply chunk type (`NBD_REPLY_TYPE_*`).
    ReplyType: u16 {
        None = NBD_REPLY_TYPE_NONE,
        OffsetData = NBD_REPLY_TYPE_OFFSET_DATA,
        OffsetHole = NBD_REPLY_TYPE_OFFSET_HOLE,
        BlockStatus = NBD_REPLY_TYPE_BLOCK_STATUS,
        BlockStatusExt = NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
        Error = NBD_REPLY_TYPE_ERROR,
        ErrorOffset = NBD_REPLY_TYPE_ERROR_OFFSET,
    }
}

impl ReplyType {
    /// Error chunk (bit 15 set), known or not.
    pub const fn is_error(self) -> bool {
        self.to_raw() & NBD_REPLY_TYPE_ERROR_BIT != 0
    }
}

/// An NBD error value. Closed on purpose: a server can only send values the spec defines
/// (decoded replies carry the raw `u32`, see [`Errno::from_wire`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    Perm = NBD_EPERM,
    Io = NBD_EIO,
    /// The spec: the server SHOULD NOT send it "if at all possible".
    NoMem = NBD_ENOMEM,
    Inval = NBD_EINVAL,
    NoSpc = NBD_ENOSPC,
    Overflow = NBD_EOVERFLOW,
    /// Only for `NBD_CMD_WRITE_ZEROES` with `NBD_CMD_FLAG_FAST_ZERO`.
    NotSup = NBD_ENOTSUP,
    Shutdown = NBD_ESHUTDOWN,
}

impl Errno {
    pub const fn to_u32(self) -> u32 {
        self as u32
    }

    /// The defined value, or `None` (the spec: a client treats unknown values as EINVAL).
    pub const fn from_wire(v: u32) -> Option<Self> {
        Some(match v {
            NBD_EPERM => Errno::Perm,
            NBD_EIO => Errno::Io,
            NBD_ENOMEM => Errno::NoMem,
            NBD_EINVAL => Errno::Inval,
            NBD_ENOSPC => Errno::NoSpc,
            NBD_EOVERFLOW => Errno::Overflow,
            NBD_ENOTSUP => Errno::NotSup,
            NBD_ESHUTDOWN => Errno::Shutdown,
            _ => return None,
        })
    }

    /// Maps a host errno to the NBD error to report ("Error values"): EPERM/EACCES/EROFS ->
    /// EPERM; EDQUOT/EFBIG/ENOSPC -> ENOSPC; EIO, ENOMEM, EOVERFLOW, ENOTSUP (= EOPNOTSUPP),
    /// ESHUTDOWN as themselves; anything else -> EINVAL. The spec allows ENOTSUP only as the
    /// answer to a FAST_ZERO write-zeroes: a server passing other errors through must remap it.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::EPERM | libc::EACCES | libc::EROFS => Errno::Perm,
            libc::EIO => Errno::Io,
            libc::ENOMEM => Errno::NoMem,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Errno::NoSpc,
            libc::EOVERFLOW => Errno::Overflow,
            libc::ESHUTDOWN => Errno::Shutdown,
            e if e == libc::ENOTSUP || e == libc::EOPNOTSUPP => Errno::NotSup,
            _ => Errno::Inval,
        }
    }

    /// [`Errno::from_errno`] for an `io::Error`; without an OS code, by kind (failures of the
    /// I/O itself -> EIO, unknown kinds -> EINVAL).
    pub fn from_io_error(e: &io::Error) -> Self {
        if let Some(code) = e.raw_os_error() {
            return Self::from_errno(code);
        }
        use io::ErrorKind as K;
        match e.kind() {
            K::PermissionDenied | K::ReadOnlyFilesystem => Errno::Perm,
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge => Errno::NoSpc,
            K::OutOfMemory => Errno::NoMem,
            K::Unsupported => Errno::NotSup,
            K::UnexpectedEof | K::WriteZero | K::TimedOut | K::Interrupted | K::BrokenPipe => {
                Errno::Io
            }
            _ => Errno::Inval,
        }
    }
}

impl From<Errno> for u32 {
    fn from(e: Errno) -> u32 {
        e.to_u32()
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Errno::Perm => "NBD_EPERM",
            Errno::Io => "NBD_EIO",
            Errno::NoMem => "NBD_ENOMEM",
            Errno::Inval => "NBD_EINVAL",
            Errno::NoSpc => "NBD_ENOSPC",
            Errno::Overflow => "NBD_EOVERFLOW",
            Errno::NotSup => "NBD_ENOTSUP",
            Errno::Shutdown => "NBD_ESHUTDOWN",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// The connection cannot continue: drop it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad {what} magic {got:#x} (expected {expected:#x})")]
    BadMagic {
        what: &'static str,
        expected: u64,
        got: u64,
    },
    /// The server MUST drop the connection on a client flag it does not know or did not offer.
    #[error("client flags {flags:#x} include flags the server did not offer ({offered:#x})")]
    ClientFlags { flags: u32, offered: u16 },
    #[error("{opt} carries {len} bytes, more than the {max} the server will read or skip")]
    OptionTooLarge { opt: Opt, len: u32, max: u32 },
    #[error("request {cookie:#x} carries a {len}-byte payload, more than the {max}-byte limit")]
    PayloadTooLarge { cookie: u64, len: u64, max: u64 },
    #[error("reply of {len} bytes exceeds the {max}-byte limit")]
    ReplyTooLarge { len: u64, max: u64 },
    /// A reply (client side) that contradicts the spec's layout.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// An option that was consumed in full but cannot be accepted: answer with
/// [`OptionError::rep_error`] and go on (a rejected `NBD_OPT_EXPORT_NAME` cannot be answered:
/// disconnect).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("option data of {len} bytes exceeds the {max}-byte limit")]
    TooBig { len: u32, max: u32 },
    #[error("{count} queries exceed the limit of {max}")]
    TooManyQueries { count: u32, max: u32 },
    #[error("the option takes no data, got {0} bytes")]
    UnexpectedData(u32),
    #[error("{0} runs past the end of the option data")]
    Truncated(&'static str),
    #[error("{0} bytes after the end of the option")]
    TrailingData(usize),
    #[error("{what} of {len} bytes is longer than 4096")]
    StringTooLong { what: &'static str, len: u32 },
    #[error("{0} is not valid UTF-8 without NUL")]
    BadString(&'static str),
}

impl OptionError {
    /// The error reply the spec asks for.
    pub fn rep_error(&self) -> RepError {
        match self {
            OptionError::TooBig { .. } | OptionError::TooManyQueries { .. } => RepError::TooBig,
            _ => RepError::Invalid,
        }
    }

    /// The complete reply: [`OptionError::rep_error`] with this error's text as message.
    pub fn reply(&self) -> OptionReply {
        OptionReply::error(self.rep_error(), self.to_string())
    }
}

/// A well-framed request the server must refuse: consume its payload, then reply with
/// [`InvalidRequest::errno`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("unknown command {0:#x}")]
    UnknownCommand(u16),
    #[error("{0} is not advertised by this export")]
    NotAdvertised(Command),
    #[error("command flags {flags:#x} are not valid for {command} on this connection")]
    BadFlags { command: Command, flags: u16 },
    #[error("{0} does not take a payload here")]
    UnexpectedPayload(Command),
    #[error("{0} on a read-only export")]
    ReadOnly(Command),
    #[error("malformed block status payload of {0} bytes")]
    BadBlockStatusPayload(usize),
}

impl InvalidRequest {
    pub fn errno(&self) -> Errno {
        match self {
            InvalidRequest::ReadOnly(_) => Errno::Perm,
            _ => Errno::Inval,
        }
    }
}

/// The caller asked for something the wire cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{what} of {len} bytes is longer than 4096")]
    StringTooLong { what: &'static str, len: usize },
    #[error("{what} {value} does not fit its field")]
    Overflow { what: &'static str, value: u64 },
    #[error("{0} must be nonzero")]
    Zero(&'static str),
    #[error("a block status chunk needs 1 to 2^20 extents, got {0}")]
    ExtentCount(usize),
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// Panic-free big-endian reader over a slice.
struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_first_chunk::<2>()?;
        self.0 = t;
        Some(u16::from_be_bytes(*h))
    }

    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_first_chunk::<4>()?;
        self.0 = t;
        Some(u32::from_be_bytes(*h))
    }

    fn u64(&mut self) -> Option<u64> {
        let (h, t) = self.0.split_first_chunk::<8>()?;
        self.0 = t;
        Some(u64::from_be_bytes(*h))
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (h, t) = self.0.split_at_checked(n)?;
        self.0 = t;
        Some(h)
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

fn u32_len(what: &'static str, n: usize) -> Result<u32, EncodeError> {
    u32::try_from(n).map_err(|_| EncodeError::Overflow {
        what,
        value: n as u64,
    })
}

/// A spec string: at most 4096 bytes, UTF-8, no NUL.
fn parse_string(what: &'static str, b: &[u8]) -> Result<String, OptionError> {
    if b.len() > NBD_MAX_STRING {
        return Err(OptionError::StringTooLong {
            what,
            len: b.len() as u32,
        });
    }
    if b.contains(&0) {
        return Err(OptionError::BadString(what));
    }
    String::from_utf8(b.to_vec()).map_err(|_| OptionError::BadString(what))
}

fn check_string(what: &'static str, s: &str) -> Result<(), EncodeError> {
    if s.len() > NBD_MAX_STRING {
        return Err(EncodeError::StringTooLong { what, len: s.len() });
    }
    Ok(())
}

/// `s` cut to at most 4096 bytes on a character boundary (messages are informational).
fn truncate_message(s: &str) -> &str {
    if s.len() <= NBD_MAX_STRING {
        return s;
    }
    let mut end = NBD_MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

/// Client side: reply strings are decoded leniently (invalid UTF-8 replaced), they are shown
/// to humans or compared by the caller.
fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Capacity of [`HeaderBuf`]: the largest fixed header (extended chunk header, 32, plus the
/// 12-byte OFFSET_HOLE payload) with room to spare.
pub const HEADER_BUF_CAP: usize = 48;

/// A small encoded message or header, held inline (no allocation). Deref to `&[u8]`, so it
/// can be the `IoSlice` in front of a payload in a vectored write.
#[derive(Clone, Copy)]
pub struct HeaderBuf {
    buf: [u8; HEADER_BUF_CAP],
    len: u8,
}

impl HeaderBuf {
    const fn new() -> Self {
        HeaderBuf {
            buf: [0; HEADER_BUF_CAP],
            len: 0,
        }
    }

    /// Appends `b`. Callers in this module never exceed the capacity (every header has a fixed
    /// size below it); if one did, the bytes are dropped and debug builds assert.
    fn put(&mut self, b: &[u8]) {
        let start = self.len as usize;
        let end = start + b.len();
        match self.buf.get_mut(start..end) {
            Some(dst) => {
                dst.copy_from_slice(b);
                self.len = end as u8;
            }
            None => debug_assert!(false, "HeaderBuf overflow"),
        }
    }

    fn u16(&mut self, v: u16) {
        self.put(&v.to_be_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.put(&v.to_be_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.put(&v.to_be_bytes());
    }

    pub fn as_slice(&self) -> &[u8] {
        self.buf.get(..self.len as usize).unwrap_or(&[])
    }

    /// Copies into a `Bytes` (allocates; for callers that queue `Bytes` frames).
    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(self.as_slice())
    }
}

impl Deref for HeaderBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for HeaderBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for HeaderBuf {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for HeaderBuf {}

impl fmt::Debug for HeaderBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HeaderBuf(")?;
        for b in self.as_slice() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake: greeting and client flags
// ---------------------------------------------------------------------------------------------

/// The newstyle greeting: `NBDMAGIC`, `IHAVEOPT`, 16-bit handshake flags (18 bytes). cairn
/// offers `NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`.
pub fn encode_greeting(handshake_flags: u16) -> HeaderBuf {
    let mut h = HeaderBuf::new();
    h.u64(NBDMAGIC);
    h.u64(IHAVEOPT);
    h.u16(handshake_flags);
    h
}

/// Client side: the greeting's handshake flags.
pub fn decode_greeting(buf: &mut BytesMut) -> Result<Option<u16>, ProtoError> {
    let Some(h) = buf.first_chunk::<GREETING_LEN>() else {
        return Ok(None);
    };
    let mut r = Rd(h);
    let (magic, opt, flags) = match (r.u64(), r.u64(), r.u16()) {
        (Some(m), Some(o), Some(f)) => (m, o, f),
        _ => return Ok(None),
    };
    if magic != NBDMAGIC {
        return Err(ProtoError::BadMagic {
            what: "greeting",
            expected: NBDMAGIC,
            got: magic,
        });
    }
    if opt != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "newstyle greeting",
            expected: IHAVEOPT,
            got: opt,
        });
    }
    buf.advance(GREETING_LEN);
    Ok(Some(flags))
}

/// The client's 32-bit flags, validated against what the server offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle (the server MAY honour fixed newstyle without it).
    pub fixed_newstyle: bool,
    /// No 124 zero bytes after the `NBD_OPT_EXPORT_NAME` reply.
    pub no_zeroes: bool,
}

impl ClientFlags {
    pub const fn bits(self) -> u32 {
        (if self.fixed_newstyle {
            NBD_FLAG_C_FIXED_NEWSTYLE
        } else {
            0
        }) | (if self.no_zeroes {
            NBD_FLAG_C_NO_ZEROES
        } else {
            0
        })
    }

    /// Validates `flags` against the handshake flags the server sent: an unknown flag, or one
    /// whose server counterpart was not offered, is a [`ProtoError::ClientFlags`] (the server
    /// MUST drop the connection).
    pub fn from_bits(flags: u32, offered: u16) -> Result<Self, ProtoError> {
        let mut allowed = 0;
        if offered & NBD_FLAG_FIXED_NEWSTYLE != 0 {
            allowed |= NBD_FLAG_C_FIXED_NEWSTYLE;
        }
        if offered & NBD_FLAG_NO_ZEROES != 0 {
            allowed |= NBD_FLAG_C_NO_ZEROES;
        }
        if flags & !allowed != 0 {
            return Err(ProtoError::ClientFlags { flags, offered });
        }
        Ok(ClientFlags {
            fixed_newstyle: flags & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: flags & NBD_FLAG_C_NO_ZEROES != 0,
        })
    }

    /// Client side: the 4 bytes to send.
    pub fn encode(self) -> HeaderBuf {
        let mut h = HeaderBuf::new();
        h.u32(self.bits());
        h
    }
}

/// Server side: reads the client flags and validates them (see [`ClientFlags::from_bits`]).
pub fn decode_client_flags(
    buf: &mut BytesMut,
    offered: u16,
) -> Result<Option<ClientFlags>, ProtoError> {
    let Some(h) = buf.first_chunk::<CLIENT_FLAGS_LEN>() else {
        return Ok(None);
    };
    let flags = ClientFlags::from_bits(u32::from_be_bytes(*h), offered)?;
    buf.advance(CLIENT_FLAGS_LEN);
    Ok(Some(flags))
}

// ---------------------------------------------------------------------------------------------
// Handshake: options (client -> server)
// ---------------------------------------------------------------------------------------------

/// `IHAVEOPT`, option code, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub opt: Opt,
    pub len: u32,
}

impl OptionHeader {
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, ProtoError> {
        let Some(h) = buf.first_chunk::<OPTION_HEADER_LEN>() else {
            return Ok(None);
        };
        let mut r = Rd(h);
        let (magic, opt, len) = match (r.u64(), r.u32(), r.u32()) {
            (Some(m), Some(o), Some(l)) => (m, o, l),
            _ => return Ok(None),
        };
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "option",
                expected: IHAVEOPT,
                got: magic,
            });
        }
        buf.advance(OPTION_HEADER_LEN);
        Ok(Some(OptionHeader {
            opt: Opt::from_raw(opt),
            len,
        }))
    }

    pub fn encode(&self) -> HeaderBuf {
        let mut h = HeaderBuf::new();
        h.u64(IHAVEOPT);
        h.u32(self.opt.to_raw());
        h.u32(self.len);
        h
    }
}

/// Data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InfoRequest {
    /// Empty = the default export.
    pub name: String,
    /// As sent (the spec forbids duplicates; the server must ignore types it does not know).
    pub requests: Vec<InfoType>,
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetaContextRequest {
    pub name: String,
    /// Each `namespace:leaf` by the spec; syntax is left to the server (queries of unknown
    /// namespaces MUST be ignored, not rejected).
    pub queries: Vec<String>,
}

/// A decoded option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    /// Enters transmission; errors cannot be reported (disconnect instead).
    ExportName(String),
    /// Any data is ignored, as the spec asks. The server replies `NBD_REP_ACK` and closes.
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    ExtendedHeaders,
    /// An option this codec does not know; its data was skipped. Answer `NBD_REP_ERR_UNSUP`.
    Unknown(u32),
}

/// Bounds on what [`OptionDecoder`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionLimits {
    /// Largest option data that is buffered and parsed. Larger data of a known option is
    /// skipped and the option rejected with `NBD_REP_ERR_TOO_BIG`.
    pub max_payload: u32,
    /// Largest data skipped (without buffering) for unknown or oversized options; beyond it the
    /// connection is dropped ([`ProtoError::OptionTooLarge`]; the spec lets a server end a
    /// session it believes is a denial of service).
    pub max_skip: u32,
    /// Most meta context queries in one option (more: `NBD_REP_ERR_TOO_BIG`).
    pub max_queries: u32,
}

impl Default for OptionLimits {
    fn default() -> Self {
        OptionLimits {
            // A 4096-byte name plus a dozen 4096-byte queries.
            max_payload: 64 * 1024,
            max_skip: 1 << 20,
            max_queries: 256,
        }
    }
}

impl OptionRequest {
    pub fn opt(&self) -> Opt {
        match self {
            OptionRequest::ExportName(_) => Opt::ExportName,
            OptionRequest::Abort => Opt::Abort,
            OptionRequest::List => Opt::List,
            OptionRequest::StartTls => Opt::StartTls,
            OptionRequest::Info(_) => Opt::Info,
            OptionRequest::Go(_) => Opt::Go,
            OptionRequest::StructuredReply => Opt::StructuredReply,
            OptionRequest::ListMetaContext(_) => Opt::ListMetaContext,
            OptionRequest::SetMetaContext(_) => Opt::SetMetaContext,
            OptionRequest::ExtendedHeaders => Opt::ExtendedHeaders,
            OptionRequest::Unknown(code) => Opt::from_raw(*code),
        }
    }

    /// Parses the data of option `opt` (the whole data, as bounded by the option header).
    pub fn parse(opt: Opt, data: &[u8], limits: &OptionLimits) -> Result<Self, OptionError> {
        let no_data = |req: OptionRequest| {
            if data.is_empty() {
                Ok(req)
            } else {
                Err(OptionError::UnexpectedData(data.len() as u32))
            }
        };
        match opt {
            Opt::ExportName => Ok(OptionRequest::ExportName(parse_string(
                "export name",
                data,
            )?)),
            Opt::Abort => Ok(OptionRequest::Abort),
            Opt::List => no_data(OptionRequest::List),
            Opt::StartTls => no_data(OptionRequest::StartTls),
            Opt::StructuredReply => no_data(OptionRequest::StructuredReply),
            Opt::ExtendedHeaders => no_data(OptionRequest::ExtendedHeaders),
            Opt::Info => Ok(OptionRequest::Info(parse_info_request(data)?)),
            Opt::Go => Ok(OptionRequest::Go(parse_info_request(data)?)),
            Opt::ListMetaContext => Ok(OptionRequest::ListMetaContext(parse_meta_request(
                data, limits,
            )?)),
            Opt::SetMetaContext => Ok(OptionRequest::SetMetaContext(parse_meta_request(
                data, limits,
            )?)),
            Opt::Unknown(code) => Ok(OptionRequest::Unknown(code)),
        }
    }

    /// Client side: appends header and data. An `Unknown` option is sent without data (use
    /// [`encode_option_raw`] for arbitrary data).
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let mut data = BytesMut::new();
        match self {
            OptionRequest::ExportName(name) => {
                check_string("export name", name)?;
                data.put_slice(name.as_bytes());
            }
            OptionRequest::Info(r) | OptionRequest::Go(r) => {
                check_string("export name", &r.name)?;
                let n = u16::try_from(r.requests.len()).map_err(|_| EncodeError::Overflow {
                    what: "information request count",
                    value: r.requests.len() as u64,
                })?;
                data.put_u32(r.name.len() as u32);
                data.put_slice(r.name.as_bytes());
                data.put_u16(n);
                for t in &r.requests {
                    data.put_u16(t.to_raw());
                }
            }
            OptionRequest::ListMetaContext(r) | OptionRequest::SetMetaContext(r) => {
                check_string("export name", &r.name)?;
                data.put_u32(r.name.len() as u32);
                data.put_slice(r.name.as_bytes());
                data.put_u32(u32_len("query count", r.queries.len())?);
                for q in &r.queries {
                    check_string("query", q)?;
                    data.put_u32(q.len() as u32);
                    data.put_slice(q.as_bytes());
                }
            }
            OptionRequest::Abort
            | OptionRequest::List
            | OptionRequest::StartTls
            | OptionRequest::StructuredReply
            | OptionRequest::ExtendedHeaders
            | OptionRequest::Unknown(_) => {}
        }
        encode_option_raw(dst, self.opt().to_raw(), &data)
    }
}

/// Client side (and tests): an option with arbitrary code and data.
pub fn encode_option_raw(dst: &mut BytesMut, opt: u32, data: &[u8]) -> Result<(), EncodeError> {
    let len = u32_len("option data", data.len())?;
    dst.reserve(OPTION_HEADER_LEN + data.len());
    dst.put_slice(
        &OptionHeader {
            opt: Opt::from_raw(opt),
            len,
        }
        .encode(),
    );
    dst.put_slice(data);
    Ok(())
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, OptionError> {
    let mut r = Rd(data);
    let name_len = r
        .u32()
        .ok_or(OptionError::Truncated("export name length"))?;
    if name_len as usize > NBD_MAX_STRING {
        return Err(OptionError::StringTooLong {
            what: "export name",
            len: name_len,
        });
    }
    let name = r
        .take(name_len as usize)
        .ok_or(OptionError::Truncated("export name"))?;
    let name = parse_string("export name", name)?;
    let n = r
        .u16()
        .ok_or(OptionError::Truncated("information request count"))?;
    let list = r
        .take(n as usize * 2)
        .ok_or(OptionError::Truncated("information requests"))?;
    if r.len() != 0 {
        return Err(OptionError::TrailingData(r.len()));
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| {
            let mut r = Rd(c);
            InfoType::from_raw(r.u16().unwrap_or(0))
        })
        .collect();
    Ok(InfoRequest { name, requests })
}

fn parse_meta_request(
    data: &[u8],
    limits: &OptionLimits,
) -> Result<MetaContextRequest, OptionError> {
    let mut r = Rd(data);
    let name_len = r
        .u32()
        .ok_or(OptionError::Truncated("export name length"))?;
    if name_len as usize > NBD_MAX_STRING {
        return Err(OptionError::StringTooLong {
            what: "export name",
            len: name_len,
        });
    }
    let name = r
        .take(name_len as usize)
        .ok_or(OptionError::Truncated("export name"))?;
    let name = parse_string("export name", name)?;
    let count = r.u32().ok_or(OptionError::Truncated("query count"))?;
    if count > limits.max_queries {
        return Err(OptionError::TooManyQueries {
            count,
            max: limits.max_queries,
        });
    }
    // Every query takes at least its 4-byte length: a count the data cannot hold is caught
    // before anything is allocated for it.
    if count as usize > r.len() / 4 {
        return Err(OptionError::Truncated("queries"));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = r.u32().ok_or(OptionError::Truncated("query length"))?;
        if len as usize > NBD_MAX_STRING {
            return Err(OptionError::StringTooLong { what: "query", len });
        }
        let q = r
            .take(len as usize)
            .ok_or(OptionError::Truncated("query"))?;
        queries.push(parse_string("query", q)?);
    }
    if r.len() != 0 {
        return Err(OptionError::TrailingData(r.len()));
    }
    Ok(MetaContextRequest { name, queries })
}

/// What [`OptionDecoder::decode`] yields: one per option the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionEvent {
    Request(OptionRequest),
    /// Consumed, not acceptable: reply `error.rep_error()` to `opt` (for `ExportName`:
    /// disconnect, it cannot be answered).
    Rejected {
        opt: Opt,
        error: OptionError,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OptState {
    Header,
    /// Buffering `len` bytes of data of a known option.
    Data {
        opt: Opt,
        len: u32,
    },
    /// Discarding `remaining` bytes; then yield the event `outcome` describes.
    Skip {
        opt: Opt,
        len: u32,
        remaining: u32,
        outcome: SkipOutcome,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SkipOutcome {
    /// Unknown option or ABORT: a `Request`.
    Request,
    /// Known option with data above `max_payload`: `Rejected(TooBig)`.
    TooBig,
}

/// Server side: decodes options from the receive buffer, one event per option, skipping data
/// it will not buffer so that memory stays bounded by [`OptionLimits::max_payload`].
///
/// ```text
/// loop {
///     match dec.decode(&mut buf)? {            // Err: drop the connection
///         Some(OptionEvent::Request(r)) => ...,  // answer it
///         Some(OptionEvent::Rejected { opt, error }) => send error.reply() to opt,
///         None => read more into buf,
///     }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct OptionDecoder {
    limits: OptionLimits,
    state: OptState,
}

impl OptionDecoder {
    pub fn new(limits: OptionLimits) -> Self {
        OptionDecoder {
            limits,
            state: OptState::Header,
        }
    }

    pub fn limits(&self) -> &OptionLimits {
        &self.limits
    }

    /// True between options (nothing of a partial option consumed).
    pub fn is_idle(&self) -> bool {
        self.state == OptState::Header
    }

    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<OptionEvent>, ProtoError> {
        loop {
            match self.state {
                OptState::Header => {
                    let Some(OptionHeader { opt, len }) = OptionHeader::decode(buf)? else {
                        return Ok(None);
                    };
                    let skip = match opt {
                        Opt::Unknown(_) | Opt::Abort => Some(SkipOutcome::Request),
                        _ if len > self.limits.max_payload => Some(SkipOutcome::TooBig),
                        _ => None,
                    };
                    self.state = match skip {
                        None => OptState::Data { opt, len },
                        Some(_) if len > self.limits.max_skip => {
                            return Err(ProtoError::OptionTooLarge {
                                opt,
                                len,
                                max: self.limits.max_skip,
                            });
                        }
                        Some(outcome) => OptState::Skip {
                            opt,
                            len,
                            remaining: len,
                            outcome,
                        },
                    };
                }
                OptState::Data { opt, len } => {
                    let n = len as usize;
                    let Some(data) = buf.get(..n) else {
                        // Bounded: n <= max_payload.
                        buf.reserve(n - buf.len());
                        return Ok(None);
                    };
                    let ev = match OptionRequest::parse(opt, data, &self.limits) {
                        Ok(r) => OptionEvent::Request(r),
                        Err(error) => OptionEvent::Rejected { opt, error },
                    };
                    buf.advance(n);
                    self.state = OptState::Header;
                    return Ok(Some(ev));
                }
                OptState::Skip {
                    opt,
                    len,
                    remaining,
                    outcome,
                } => {
                    let n = buf.len().min(remaining as usize);
                    buf.advance(n);
                    let remaining = remaining - n as u32;
                    if remaining > 0 {
                        self.state = OptState::Skip {
                            opt,
                            len,
                            remaining,
                            outcome,
                        };
                        return Ok(None);
                    }
                    self.state = OptState::Header;
                    return Ok(Some(match outcome {
                        SkipOutcome::Request => OptionEvent::Request(match opt {
                            Opt::Abort => OptionRequest::Abort,
                            other => OptionRequest::Unknown(other.to_raw()),
                        }),
                        SkipOutcome::TooBig => OptionEvent::Rejected {
                            opt,
                            error: OptionError::TooBig {
                                len,
                                max: self.limits.max_payload,
                            },
                        },
                    }));
                }
            }
        }
    }
}

impl Default for OptionDecoder {
    fn default() -> Self {
        Self::new(OptionLimits::default())
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake: option replies (server -> client)
// ---------------------------------------------------------------------------------------------

/// An `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// Mandatory before the ACK of INFO/GO.
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    /// Exactly 14 bytes on the wire.
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// Client side: an info type this codec does not know (clients MUST ignore these).
    Unknown {
        ty: u16,
        data: Bytes,
    },
}

/// An option reply (fixed newstyle): the header's reply type and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply {
    Ack,
    /// One `NBD_OPT_LIST` entry; `description` is the free text after the name.
    Server {
        name: String,
        description: String,
    },
    Info(Info),
    /// `id` is reserved (SHOULD be 0) in replies to LIST_META_CONTEXT.
    MetaContext {
        id: u32,
        name: String,
    },
    /// Any error reply; the message (may be empty) is for humans. Cut to 4096 bytes on encode.
    Error {
        error: RepError,
        message: String,
    },
    /// Client side: a non-error reply type this codec does not know.
    Unknown {
        ty: u32,
        data: Bytes,
    },
}

impl OptionReply {
    pub fn error(error: RepError, message: impl Into<String>) -> Self {
        OptionReply::Error {
            error,
            message: message.into(),
        }
    }

    /// The reply type on the wire.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionReply::Ack => NBD_REP_ACK,
            OptionReply::Server { .. } => NBD_REP_SERVER,
            OptionReply::Info(_) => NBD_REP_INFO,
            OptionReply::MetaContext { .. } => NBD_REP_META_CONTEXT,
            OptionReply::Error { error, .. } => error.to_raw() | NBD_REP_FLAG_ERROR,
            OptionReply::Unknown { ty, .. } => *ty,
        }
    }

    /// Appends the reply to option `opt` (header + data) to `dst`.
    pub fn encode(&self, opt: Opt, dst: &mut BytesMut) -> Result<(), EncodeError> {
        // Data first into a small scratch (handshake only), then the header with its length.
        let mut data = BytesMut::new();
        match self {
            OptionReply::Ack => {}
            OptionReply::Server { name, description } => {
                check_string("export name", name)?;
                data.put_u32(name.len() as u32);
                data.put_slice(name.as_bytes());
                data.put_slice(truncate_message(description).as_bytes());
            }
            OptionReply::Info(info) => match info {
                Info::Export { size, flags } => {
                    data.put_u16(NBD_INFO_EXPORT);
                    data.put_u64(*size);
                    data.put_u16(*flags);
                }
                Info::Name(name) => {
                    check_string("export name", name)?;
                    data.put_u16(NBD_INFO_NAME);
                    data.put_slice(name.as_bytes());
                }
                Info::Description(d) => {
                    data.put_u16(NBD_INFO_DESCRIPTION);
                    data.put_slice(truncate_message(d).as_bytes());
                }
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => {
                    data.put_u16(NBD_INFO_BLOCK_SIZE);
                    data.put_u32(*min);
                    data.put_u32(*preferred);
                    data.put_u32(*max);
                }
                Info::Unknown { ty, data: d } => {
                    data.put_u16(*ty);
                    data.put_slice(d);
                }
            },
            OptionReply::MetaContext { id, name } => {
                check_string("metadata context name", name)?;
                data.put_u32(*id);
                data.put_slice(name.as_bytes());
            }
            OptionReply::Error { message, .. } => {
                data.put_slice(truncate_message(message).as_bytes());
            }
            OptionReply::Unknown { data: d, .. } => data.put_slice(d),
        }
        let len = u32_len("option reply data", data.len())?;
        dst.reserve(OPTION_REPLY_HEADER_LEN + data.len());
        dst.put_slice(&encode_option_reply_header(opt, self.reply_type(), len));
        dst.put_slice(&data);
        Ok(())
    }

    /// Client side: one reply, its data buffered in full (at most `max_len` bytes, else
    /// [`ProtoError::ReplyTooLarge`]). Returns the option it answers.
    pub fn decode(buf: &mut BytesMut, max_len: u32) -> Result<Option<(Opt, Self)>, ProtoError> {
        let Some(h) = buf.first_chunk::<OPTION_REPLY_HEADER_LEN>() else {
            return Ok(None);
        };
        let mut r = Rd(h);
        let (magic, opt, ty, len) = match (r.u64(), r.u32(), r.u32(), r.u32()) {
            (Some(m), Some(o), Some(t), Some(l)) => (m, o, t, l),
            _ => return Ok(None),
        };
        if magic != NBD_OPT_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "option reply",
                expected: NBD_OPT_REPLY_MAGIC,
                got: magic,
            });
        }
        if len > max_len {
            return Err(ProtoError::ReplyTooLarge {
                len: len.into(),
                max: max_len.into(),
            });
        }
        let total = OPTION_REPLY_HEADER_LEN + len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(OPTION_REPLY_HEADER_LEN);
        let data = buf.split_to(len as usize).freeze();
        Ok(Some((Opt::from_raw(opt), Self::parse(ty, data)?)))
    }

    fn parse(ty: u32, mut data: Bytes) -> Result<Self, ProtoError> {
        Ok(match ty {
            NBD_REP_ACK if data.is_empty() => OptionReply::Ack,
            NBD_REP_ACK => return Err(ProtoError::Malformed("NBD_REP_ACK with data")),
            NBD_REP_SERVER => {
                let mut r = Rd(&data);
                let n = r.u32().ok_or(ProtoError::Malformed("NBD_REP_SERVER"))?;
                let name = r
                    .take(n as usize)
                    .ok_or(ProtoError::Malformed("NBD_REP_SERVER name length"))?;
                OptionReply::Server {
                    name: lossy(name),
                    description: lossy(r.0),
                }
            }
            NBD_REP_INFO => {
                let t = Rd(&data)
                    .u16()
                    .ok_or(ProtoError::Malformed("NBD_REP_INFO without type"))?;
                data.advance(2);
                let mut r = Rd(&data);
                OptionReply::Info(match t {
                    NBD_INFO_EXPORT => match (r.u64(), r.u16(), r.len()) {
                        (Some(size), Some(flags), 0) => Info::Export { size, flags },
                        _ => return Err(ProtoError::Malformed("NBD_INFO_EXPORT length")),
                    },
                    NBD_INFO_NAME => Info::Name(lossy(&data)),
                    NBD_INFO_DESCRIPTION => Info::Description(lossy(&data)),
                    NBD_INFO_BLOCK_SIZE => match (r.u32(), r.u32(), r.u32(), r.len()) {
                        (Some(min), Some(preferred), Some(max), 0) => Info::BlockSize {
                            min,
                            preferred,
                            max,
                        },
                        _ => return Err(ProtoError::Malformed("NBD_INFO_BLOCK_SIZE length")),
                    },
                    ty => Info::Unknown { ty, data },
                })
            }
            NBD_REP_META_CONTEXT => {
                let mut r = Rd(&data);
                let id = r
                    .u32()
                    .ok_or(ProtoError::Malformed("NBD_REP_META_CONTEXT"))?;
                OptionReply::MetaContext {
                    id,
                    name: lossy(r.0),
                }
            }
            t if t & NBD_REP_FLAG_ERROR != 0 => OptionReply::Error {
                error: RepError::from_raw(t),
                message: lossy(&data),
            },
            ty => OptionReply::Unknown { ty, data },
        })
    }
}

/// The 20-byte option reply header.
pub fn encode_option_reply_header(opt: Opt, reply_type: u32, len: u32) -> HeaderBuf {
    let mut h = HeaderBuf::new();
    h.u64(NBD_OPT_REPLY_MAGIC);
    h.u32(opt.to_raw());
    h.u32(reply_type);
    h.u32(len);
    h
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless the client set
/// `NBD_FLAG_C_NO_ZEROES`, 124 zero bytes.
pub fn encode_export_name_reply(dst: &mut BytesMut, size: u64, tflags: u16, no_zeroes: bool) {
    dst.reserve(EXPORT_NAME_REPLY_LEN + EXPORT_NAME_ZEROES);
    dst.put_u64(size);
    dst.put_u16(tflags);
    if !no_zeroes {
        dst.put_bytes(0, EXPORT_NAME_ZEROES);
    }
}

/// Client side: the `NBD_OPT_EXPORT_NAME` reply as (size, transmission flags).
pub fn decode_export_name_reply(buf: &mut BytesMut, no_zeroes: bool) -> Option<(u64, u16)> {
    let total = EXPORT_NAME_REPLY_LEN + if no_zeroes { 0 } else { EXPORT_NAME_ZEROES };
    if buf.len() < total {
        return None;
    }
    let mut r = Rd(buf.as_ref());
    let (size, flags) = (r.u64()?, r.u16()?);
    buf.advance(total);
    Some((size, flags))
}

/// Splits a metadata context name or query into namespace and leaf (`base:allocation` ->
/// `("base", "allocation")`); `None` without a colon or with an empty namespace.
pub fn split_meta_context(s: &str) -> Option<(&str, &str)> {
    let (ns, leaf) = s.split_once(':')?;
    (!ns.is_empty()).then_some((ns, leaf))
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests
// ---------------------------------------------------------------------------------------------

/// Which headers the transmission phase uses (negotiated by `NBD_OPT_EXTENDED_HEADERS`).
/// Structured replies are a separate, connection-level choice in compact mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HeaderMode {
    /// 28-byte requests (32-bit length); simple or 20-byte structured replies.
    #[default]
    Compact,
    /// 32-byte requests (64-bit length); 32-byte extended replies only.
    Extended,
}

impl HeaderMode {
    pub const fn request_len(self) -> usize {
        match self {
            HeaderMode::Compact => COMPACT_REQUEST_LEN,
            HeaderMode::Extended => EXTENDED_REQUEST_LEN,
        }
    }

    pub const fn chunk_header_len(self) -> usize {
        match self {
            HeaderMode::Compact => STRUCTURED_CHUNK_LEN,
            HeaderMode::Extended => EXTENDED_CHUNK_LEN,
        }
    }
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags, raw (`NBD_CMD_FLAG_*`); see [`Request::validate`].
    pub flags: u16,
    pub command: Command,
    /// Opaque; echoed in every reply.
    pub cookie: u64,
    pub offset: u64,
    /// The header's length field: 32 bits in compact mode. In extended mode it is a payload
    /// length with `NBD_CMD_FLAG_PAYLOAD_LEN` and an effect length without.
    pub length: u64,
}

impl Request {
    pub const fn has_flags(&self, flags: u16) -> bool {
        self.flags & flags == flags
    }

    /// Bytes of payload that follow this header on the wire. A WRITE's length is always its
    /// payload length, with or without `NBD_CMD_FLAG_PAYLOAD_LEN` (the extension requires the
    /// flag, but qemu 10 omits it and qemu-nbd accepts both). In extended mode any other
    /// command carries a payload only with the flag (the server consumes it even when it then
    /// fails the request).
    pub const fn payload_len(&self, mode: HeaderMode) -> u64 {
        match (mode, self.command) {
            (_, Command::Write) => self.length,
            (HeaderMode::Compact, _) => 0,
            (HeaderMode::Extended, _) => {
                if self.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0 {
                    self.length
                } else {
                    0
                }
            }
        }
    }

    /// Client side: the header bytes. Compact mode needs `length` to fit 32 bits.
    pub fn encode(&self, mode: HeaderMode) -> Result<HeaderBuf, EncodeError> {
        let mut h = HeaderBuf::new();
        match mode {
            HeaderMode::Compact => {
                let len = u32::try_from(self.length).map_err(|_| EncodeError::Overflow {
                    what: "compact request length",
                    value: self.length,
                })?;
                h.u32(NBD_REQUEST_MAGIC);
                h.u16(self.flags);
                h.u16(self.command.to_raw());
                h.u64(self.cookie);
                h.u64(self.offset);
                h.u32(len);
            }
            HeaderMode::Extended => {
                h.u32(NBD_EXTENDED_REQUEST_MAGIC);
                h.u16(self.flags);
                h.u16(self.command.to_raw());
                h.u64(self.cookie);
                h.u64(self.offset);
                h.u64(self.length);
            }
        }
        Ok(h)
    }

    /// Checks what needs no export state beyond its transmission flags `tflags` (as sent to
    /// this client): the command is known and advertised, its flags are defined for it and
    /// allowed by `tflags` and `mode`, the payload convention of `mode` is kept, and writes do
    /// not target a read-only export. Range, alignment and meta-context checks are the
    /// server's. `NBD_CMD_CACHE` is accepted without `NBD_FLAG_SEND_CACHE` (the spec notes
    /// clients that send it anyway); `NBD_CMD_DISC` is not checked (no reply is sent).
    pub fn validate(&self, mode: HeaderMode, tflags: u16) -> Result<(), InvalidRequest> {
        let cmd = self.command;
        let advertised = match cmd {
            Command::Unknown(c) => return Err(InvalidRequest::UnknownCommand(c)),
            Command::Disc => return Ok(()),
            Command::Read | Command::Write | Command::Cache | Command::BlockStatus => true,
            Command::Flush => tflags & NBD_FLAG_SEND_FLUSH != 0,
            Command::Trim => tflags & NBD_FLAG_SEND_TRIM != 0,
            Command::WriteZeroes => tflags & NBD_FLAG_SEND_WRITE_ZEROES != 0,
            Command::Resize => tflags & NBD_FLAG_SEND_RESIZE != 0,
        };
        // A read-only export advertises no TRIM or WRITE_ZEROES; the spec still wants EPERM
        // ("a write or trim request on a read-only export"), so this goes first.
        let writes = matches!(
            cmd,
            Command::Write | Command::Trim | Command::WriteZeroes | Command::Resize
        );
        if writes && tflags & NBD_FLAG_READ_ONLY != 0 {
            return Err(InvalidRequest::ReadOnly(cmd));
        }
        if !advertised {
            return Err(InvalidRequest::NotAdvertised(cmd));
        }

        // Flags defined for this command and enabled by the transmission flags.
        let mut allowed = 0u16;
        if tflags & NBD_FLAG_SEND_FUA != 0 {
            // "Valid for all commands" once SEND_FUA is advertised.
            allowed |= NBD_CMD_FLAG_FUA;
        }
        match cmd {
            Command::Read if tflags & NBD_FLAG_SEND_DF != 0 => allowed |= NBD_CMD_FLAG_DF,
            Command::WriteZeroes => {
                allowed |= NBD_CMD_FLAG_NO_HOLE;
                if tflags & NBD_FLAG_SEND_FAST_ZERO != 0 {
                    allowed |= NBD_CMD_FLAG_FAST_ZERO;
                }
            }
            Command::BlockStatus => allowed |= NBD_CMD_FLAG_REQ_ONE,
            _ => {}
        }
        let payload_form = match (mode, cmd) {
            (HeaderMode::Extended, Command::Write) => true,
            (HeaderMode::Extended, Command::BlockStatus) => {
                tflags & NBD_FLAG_BLOCK_STATUS_PAYLOAD != 0
            }
            _ => false,
        };
        if payload_form {
            allowed |= NBD_CMD_FLAG_PAYLOAD_LEN;
        }
        let bad = self.flags & !allowed;
        if bad == NBD_CMD_FLAG_PAYLOAD_LEN && mode == HeaderMode::Extended {
            return Err(InvalidRequest::UnexpectedPayload(cmd));
        }
        if bad != 0 {
            return Err(InvalidRequest::BadFlags {
                command: cmd,
                flags: bad,
            });
        }

        Ok(())
    }

    /// The addressing every reply chunk to this request needs.
    pub const fn reply_to(&self, mode: HeaderMode) -> ReplyTo {
        ReplyTo {
            mode,
            cookie: self.cookie,
            offset: self.offset,
        }
    }
}

/// Server side: decodes one request header. Consumes only the header; the payload
/// ([`Request::payload_len`] bytes) follows in `buf`. A payload above `max_payload` is a
/// [`ProtoError::PayloadTooLarge`]: the spec says to disconnect rather than read it. Set
/// `max_payload` to at least [`NBD_DEFAULT_MAX_PAYLOAD`] (the spec: payloads up to 32 MiB
/// SHOULD NOT be treated as a denial of service, whatever was advertised).
pub fn decode_request(
    buf: &mut BytesMut,
    mode: HeaderMode,
    max_payload: u64,
) -> Result<Option<Request>, ProtoError> {
    let req = match mode {
        HeaderMode::Compact => {
            let Some(h) = buf.first_chunk::<COMPACT_REQUEST_LEN>() else {
                return Ok(None);
            };
            let mut r = Rd(h);
            let magic = r.u32().unwrap_or(0);
            if magic != NBD_REQUEST_MAGIC {
                return Err(ProtoError::BadMagic {
                    what: "request",
                    expected: NBD_REQUEST_MAGIC.into(),
                    got: magic.into(),
                });
            }
            Request {
                flags: r.u16().unwrap_or(0),
                command: Command::from_raw(r.u16().unwrap_or(0)),
                cookie: r.u64().unwrap_or(0),
                offset: r.u64().unwrap_or(0),
                length: r.u32().unwrap_or(0).into(),
            }
        }
        HeaderMode::Extended => {
            let Some(h) = buf.first_chunk::<EXTENDED_REQUEST_LEN>() else {
                return Ok(None);
            };
            let mut r = Rd(h);
            let magic = r.u32().unwrap_or(0);
            if magic != NBD_EXTENDED_REQUEST_MAGIC {
                return Err(ProtoError::BadMagic {
                    what: "extended request",
                    expected: NBD_EXTENDED_REQUEST_MAGIC.into(),
                    got: magic.into(),
                });
            }
            Request {
                flags: r.u16().unwrap_or(0),
                command: Command::from_raw(r.u16().unwrap_or(0)),
                cookie: r.u64().unwrap_or(0),
                offset: r.u64().unwrap_or(0),
                length: r.u64().unwrap_or(0),
            }
        }
    };
    let payload = req.payload_len(mode);
    if payload > max_payload {
        return Err(ProtoError::PayloadTooLarge {
            cookie: req.cookie,
            len: payload,
            max: max_payload,
        });
    }
    buf.advance(mode.request_len());
    Ok(Some(req))
}

/// The payload form of an extended `NBD_CMD_BLOCK_STATUS` (with `NBD_CMD_FLAG_PAYLOAD_LEN`,
/// only when `NBD_FLAG_BLOCK_STATUS_PAYLOAD` was advertised): effect length and the context
/// ids to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatusPayload {
    pub effect_len: u64,
    pub ids: Vec<u32>,
}

impl BlockStatusPayload {
    /// `8 + 4n` bytes; anything else is invalid (the server answers EINVAL, having consumed
    /// the payload). Duplicate or unknown ids are the server's to check.
    pub fn parse(data: &[u8]) -> Result<Self, InvalidRequest> {
        let bad = || InvalidRequest::BadBlockStatusPayload(data.len());
        let mut r = Rd(data);
        let effect_len = r.u64().ok_or_else(bad)?;
        if r.len() % 4 != 0 {
            return Err(bad());
        }
        let ids =
            r.0.chunks_exact(4)
                .map(|c| Rd(c).u32().unwrap_or(0))
                .collect();
        Ok(BlockStatusPayload { effect_len, ids })
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(8 + 4 * self.ids.len());
        b.put_u64(self.effect_len);
        for id in &self.ids {
            b.put_u32(*id);
        }
        b.freeze()
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: replies (server -> client)
// ---------------------------------------------------------------------------------------------

/// The 16-byte simple reply header (`None` = success). For a successful READ the data
/// follows. Only for connections without structured replies and extended headers, or for
/// replies without payload to non-READ requests with structured replies.
pub fn simple_reply(cookie: u64, error: Option<Errno>) -> HeaderBuf {
    let mut h = HeaderBuf::new();
    h.u32(NBD_SIMPLE_REPLY_MAGIC);
    h.u32(error.map_or(0, Errno::to_u32));
    h.u64(cookie);
    h
}

/// One block status descriptor. `base:allocation` uses `NBD_STATE_HOLE | NBD_STATE_ZERO` in
/// `flags`. In compact mode both fields must fit 32 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Nonzero.
    pub length: u64,
    pub flags: u64,
}

/// Encodes the chunks of the reply to one request (structured in compact mode, extended
/// otherwise). Build it with [`Request::reply_to`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub mode: HeaderMode,
    pub cookie: u64,
    /// The request's offset: echoed in extended chunk headers (ignored in compact mode).
    pub offset: u64,
}

const fn done_flag(done: bool) -> u16 {
    if done { NBD_REPLY_FLAG_DONE } else { 0 }
}

impl ReplyTo {
    /// A chunk header for `payload_len` bytes of payload that the caller sends after it.
    pub fn chunk_header(
        &self,
        flags: u16,
        ty: ReplyType,
        payload_len: u64,
    ) -> Result<HeaderBuf, EncodeError> {
        let mut h = HeaderBuf::new();
        match self.mode {
            HeaderMode::Compact => {
                let len = u32::try_from(payload_len).map_err(|_| EncodeError::Overflow {
                    what: "structured chunk length",
                    value: payload_len,
                })?;
                h.u32(NBD_STRUCTURED_REPLY_MAGIC);
                h.u16(flags);
                h.u16(ty.to_raw());
                h.u64(self.cookie);
                h.u32(len);
            }
            HeaderMode::Extended => {
                h.u32(NBD_EXTENDED_REPLY_MAGIC);
                h.u16(flags);
                h.u16(ty.to_raw());
                h.u64(self.cookie);
                h.u64(self.offset);
                h.u64(payload_len);
            }
        }
        Ok(h)
    }

    /// `NBD_REPLY_TYPE_NONE` with `NBD_REPLY_FLAG_DONE`: the end of a successful reply (or of
    /// one whose error chunks were already sent).
    pub fn none(&self) -> HeaderBuf {
        // Length 0 always fits.
        self.chunk_header(NBD_REPLY_FLAG_DONE, ReplyType::None, 0)
            .unwrap_or_else(|_| HeaderBuf::new())
    }

    /// Chunk header plus the 8-byte offset of `NBD_REPLY_TYPE_OFFSET_DATA`; `data_len` bytes
    /// of data follow (send them as the next slice).
    pub fn offset_data(
        &self,
        done: bool,
        data_offset: u64,
        data_len: u32,
    ) -> Result<HeaderBuf, EncodeError> {
        if data_len == 0 {
            return Err(EncodeError::Zero("OFFSET_DATA length"));
        }
        let mut h = self.chunk_header(
            done_flag(done),
            ReplyType::OffsetData,
            8 + u64::from(data_len),
        )?;
        h.u64(data_offset);
        Ok(h)
    }

    /// A complete `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `hole_len` (nonzero) bytes of zeroes
    /// at `hole_offset`.
    pub fn offset_hole(
        &self,
        done: bool,
        hole_offset: u64,
        hole_len: u32,
    ) -> Result<HeaderBuf, EncodeError> {
        if hole_len == 0 {
            return Err(EncodeError::Zero("OFFSET_HOLE length"));
        }
        let mut h = self.chunk_header(done_flag(done), ReplyType::OffsetHole, 12)?;
        h.u64(hole_offset);
        h.u32(hole_len);
        Ok(h)
    }

    /// Appends a complete block status chunk for `context_id`: `NBD_REPLY_TYPE_BLOCK_STATUS`
    /// (32-bit descriptors) in compact mode, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (64-bit, with
    /// descriptor count) in extended mode. 1 to 2^20 extents, each of nonzero length.
    pub fn block_status(
        &self,
        dst: &mut BytesMut,
        done: bool,
        context_id: u32,
        extents: &[Extent],
    ) -> Result<(), EncodeError> {
        let n = extents.len();
        if n == 0 || n > NBD_MAX_EXTENTS {
            return Err(EncodeError::ExtentCount(n));
        }
        if extents.iter().any(|e| e.length == 0) {
            return Err(EncodeError::Zero("extent length"));
        }
        match self.mode {
            HeaderMode::Compact => {
                let fits = |v: u64, what| {
                    u32::try_from(v).map_err(|_| EncodeError::Overflow { what, value: v })
                };
                for e in extents {
                    fits(e.length, "compact extent length")?;
                    fits(e.flags, "compact extent flags")?;
                }
                let len = 4 + 8 * n;
                let h = self.chunk_header(done_flag(done), ReplyType::BlockStatus, len as u64)?;
                dst.reserve(h.len() + len);
                dst.put_slice(&h);
                dst.put_u32(context_id);
                for e in extents {
                    dst.put_u32(e.length as u32);
                    dst.put_u32(e.flags as u32);
                }
            }
            HeaderMode::Extended => {
                let len = 8 + 16 * n;
                let h =
                    self.chunk_header(done_flag(done), ReplyType::BlockStatusExt, len as u64)?;
                dst.reserve(h.len() + len);
                dst.put_slice(&h);
                dst.put_u32(context_id);
                dst.put_u32(n as u32);
                for e in extents {
                    dst.put_u64(e.length);
                    dst.put_u64(e.flags);
                }
            }
        }
        Ok(())
    }

    /// Appends an `NBD_REPLY_TYPE_ERROR` chunk (message cut to 4096 bytes, may be empty).
    pub fn error(&self, dst: &mut BytesMut, done: bool, error: Errno, message: &str) {
        self.put_error(dst, done, error, message, None);
    }

    /// Appends an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk: the error happened at `offset` (which
    /// lies within the request).
    pub fn error_offset(
        &self,
        dst: &mut BytesMut,
        done: bool,
        error: Errno,
        message: &str,
        offset: u64,
    ) {
        self.put_error(dst, done, error, message, Some(offset));
    }

    fn put_error(
        &self,
        dst: &mut BytesMut,
        done: bool,
        error: Errno,
        message: &str,
        offset: Option<u64>,
    ) {
        let msg = truncate_message(message).as_bytes();
        let (ty, extra) = match offset {
            Some(_) => (ReplyType::ErrorOffset, 8),
            None => (ReplyType::Error, 0),
        };
        let len = 6 + msg.len() + extra;
        // At most 6 + 4096 + 8 bytes: fits every length field.
        let h = self
            .chunk_header(done_flag(done), ty, len as u64)
            .unwrap_or_else(|_| HeaderBuf::new());
        dst.reserve(h.len() + len);
        dst.put_slice(&h);
        dst.put_u32(error.to_u32());
        dst.put_u16(msg.len() as u16);
        dst.put_slice(msg);
        if let Some(off) = offset {
            dst.put_u64(off);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: replies, client side
// ---------------------------------------------------------------------------------------------

/// A decoded structured or extended chunk, payload buffered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub ty: ReplyType,
    pub cookie: u64,
    /// The request's offset (extended headers); 0 in compact mode.
    pub offset: u64,
    pub payload: Bytes,
}

/// A decoded reply header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Raw error value (0 = success). For a successful READ the caller reads the data (its
    /// own request's length) from the buffer next.
    Simple {
        cookie: u64,
        error: u32,
    },
    Chunk(Chunk),
}

/// The payload of a chunk, by type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkBody {
    None,
    OffsetData {
        offset: u64,
        data: Bytes,
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` or `_EXT` (the chunk's `ty` tells which).
    BlockStatus {
        context_id: u32,
        extents: Vec<Extent>,
    },
    /// Any error chunk (known or not: bit 15 set). `error` is raw; `offset` only for
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    Error {
        error: u32,
        message: String,
        offset: Option<u64>,
    },
    /// A non-error type this codec does not know (the spec: the client disconnects).
    Unknown,
}

impl Chunk {
    pub const fn is_done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }

    /// Parses the payload, checking the lengths the spec fixes for each type.
    pub fn body(&self) -> Result<ChunkBody, ProtoError> {
        let p = &self.payload;
        let mut r = Rd(p);
        Ok(match self.ty {
            ReplyType::None if p.is_empty() => ChunkBody::None,
            ReplyType::None => return Err(ProtoError::Malformed("NONE chunk with payload")),
            ReplyType::OffsetData => {
                let offset = r.u64().ok_or(ProtoError::Malformed("OFFSET_DATA"))?;
                if p.len() < 9 {
                    return Err(ProtoError::Malformed("OFFSET_DATA without data"));
                }
                let mut data = p.clone();
                data.advance(8);
                ChunkBody::OffsetData { offset, data }
            }
            ReplyType::OffsetHole => match (r.u64(), r.u32(), r.len()) {
                (Some(offset), Some(length), 0) if length > 0 => {
                    ChunkBody::OffsetHole { offset, length }
                }
                _ => return Err(ProtoError::Malformed("OFFSET_HOLE")),
            },
            ReplyType::BlockStatus => {
                let context_id = r.u32().ok_or(ProtoError::Malformed("BLOCK_STATUS"))?;
                if r.len() == 0 || r.len() % 8 != 0 {
                    return Err(ProtoError::Malformed("BLOCK_STATUS length"));
                }
                let extents =
                    r.0.chunks_exact(8)
                        .map(|c| {
                            let mut d = Rd(c);
                            Extent {
                                length: d.u32().unwrap_or(0).into(),
                                flags: d.u32().unwrap_or(0).into(),
                            }
                        })
                        .collect();
                ChunkBody::BlockStatus {
                    context_id,
                    extents,
                }
            }
            ReplyType::BlockStatusExt => {
                let (context_id, count) = match (r.u32(), r.u32()) {
                    (Some(id), Some(n)) => (id, n),
                    _ => return Err(ProtoError::Malformed("BLOCK_STATUS_EXT")),
                };
                if r.len() == 0 || r.len() % 16 != 0 || r.len() / 16 != count as usize {
                    return Err(ProtoError::Malformed("BLOCK_STATUS_EXT length"));
                }
                let extents =
                    r.0.chunks_exact(16)
                        .map(|c| {
                            let mut d = Rd(c);
                            Extent {
                                length: d.u64().unwrap_or(0),
                                flags: d.u64().unwrap_or(0),
                            }
                        })
                        .collect();
                ChunkBody::BlockStatus {
                    context_id,
                    extents,
                }
            }
            t if t.is_error() => {
                let (error, mlen) = match (r.u32(), r.u16()) {
                    (Some(e), Some(m)) => (e, m),
                    _ => return Err(ProtoError::Malformed("error chunk")),
                };
                let msg = r
                    .take(mlen as usize)
                    .ok_or(ProtoError::Malformed("error chunk message length"))?;
                let message = lossy(msg);
                let offset = match t {
                    ReplyType::Error if r.len() == 0 => None,
                    ReplyType::ErrorOffset => match (r.u64(), r.len()) {
                        (Some(o), 0) => Some(o),
                        _ => return Err(ProtoError::Malformed("ERROR_OFFSET length")),
                    },
                    ReplyType::Error => return Err(ProtoError::Malformed("ERROR length")),
                    // Unknown error types: only the common prefix is defined.
                    _ => None,
                };
                ChunkBody::Error {
                    error,
                    message,
                    offset,
                }
            }
            _ => ChunkBody::Unknown,
        })
    }
}

/// Client side: decodes one reply. In compact mode a simple or structured header (the
/// magic tells); in extended mode only extended chunks. A chunk is returned with its whole
/// payload (at most `max_payload` bytes, else [`ProtoError::ReplyTooLarge`]); for a simple
/// reply only the header is consumed.
pub fn decode_reply(
    buf: &mut BytesMut,
    mode: HeaderMode,
    max_payload: u64,
) -> Result<Option<Reply>, ProtoError> {
    let Some(m) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let magic = u32::from_be_bytes(*m);
    let (hdr_len, flags, ty, cookie, offset, len) = match (mode, magic) {
        (HeaderMode::Compact, NBD_SIMPLE_REPLY_MAGIC) => {
            let Some(h) = buf.first_chunk::<SIMPLE_REPLY_LEN>() else {
                return Ok(None);
            };
            let mut r = Rd(h);
            r.u32();
            let error = r.u32().unwrap_or(0);
            let cookie = r.u64().unwrap_or(0);
            buf.advance(SIMPLE_REPLY_LEN);
            return Ok(Some(Reply::Simple { cookie, error }));
        }
        (HeaderMode::Compact, NBD_STRUCTURED_REPLY_MAGIC) => {
            let Some(h) = buf.first_chunk::<STRUCTURED_CHUNK_LEN>() else {
                return Ok(None);
            };
            let mut r = Rd(h);
            r.u32();
            (
                STRUCTURED_CHUNK_LEN,
                r.u16().unwrap_or(0),
                r.u16().unwrap_or(0),
                r.u64().unwrap_or(0),
                0,
                u64::from(r.u32().unwrap_or(0)),
            )
        }
        (HeaderMode::Extended, NBD_EXTENDED_REPLY_MAGIC) => {
            let Some(h) = buf.first_chunk::<EXTENDED_CHUNK_LEN>() else {
                return Ok(None);
            };
            let mut r = Rd(h);
            r.u32();
            (
                EXTENDED_CHUNK_LEN,
                r.u16().unwrap_or(0),
                r.u16().unwrap_or(0),
                r.u64().unwrap_or(0),
                r.u64().unwrap_or(0),
                r.u64().unwrap_or(0),
            )
        }
        (HeaderMode::Compact, got) => {
            return Err(ProtoError::BadMagic {
                what: "reply",
                expected: NBD_STRUCTURED_REPLY_MAGIC.into(),
                got: got.into(),
            });
        }
        (HeaderMode::Extended, got) => {
            return Err(ProtoError::BadMagic {
                what: "extended reply",
                expected: NBD_EXTENDED_REPLY_MAGIC.into(),
                got: got.into(),
            });
        }
    };
    if len > max_payload {
        return Err(ProtoError::ReplyTooLarge {
            len,
            max: max_payload,
        });
    }
    // len <= max_payload, which the caller chose to be addressable.
    let total = hdr_len.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
    if buf.len() < total {
        return Ok(None);
    }
    buf.advance(hdr_len);
    let payload = buf.split_to(total - hdr_len).freeze();
    Ok(Some(Reply::Chunk(Chunk {
        flags,
        ty: ReplyType::from_raw(ty),
        cookie,
        offset,
        payload,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn bm(b: &[u8]) -> BytesMut {
        BytesMut::from(b)
    }

    // ---- Hand-written vectors, byte for byte against the spec's layouts ----

    #[test]
    fn greeting_vector() {
        let g = encode_greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        let mut want = b"NBDMAGICIHAVEOPT".to_vec();
        want.extend_from_slice(&[0, 3]);
        assert_eq!(&*g, &want[..]);
        assert_eq!(g.len(), GREETING_LEN);
        let mut b = bm(&want);
        assert_eq!(decode_greeting(&mut b), Ok(Some(3)));
        assert!(b.is_empty());
    }

    #[test]
    fn compact_request_vector() {
        let wire = hex("25609513 0001 0000 0102030405060708 1122334455667788 00001000");
        assert_eq!(wire.len(), 28);
        let mut b = bm(&wire);
        let r = decode_request(&mut b, HeaderMode::Compact, 1 << 25)
            .unwrap()
            .unwrap();
        assert_eq!(
            r,
            Request {
                flags: NBD_CMD_FLAG_FUA,
                command: Command::Read,
                cookie: 0x0102030405060708,
                offset: 0x1122334455667788,
                length: 0x1000,
            }
        );
        assert!(b.is_empty());
        assert_eq!(r.payload_len(HeaderMode::Compact), 0);
        assert_eq!(&*r.encode(HeaderMode::Compact).unwrap(), &wire[..]);
    }

    #[test]
    fn compact_write_leaves_payload_in_buffer() {
        let mut wire = hex("25609513 0000 0001 00000000000000aa 0000000000000200 00000004");
        wire.extend_from_slice(b"DATAnext");
        let mut b = bm(&wire);
        let r = decode_request(&mut b, HeaderMode::Compact, 1 << 25)
            .unwrap()
            .unwrap();
        assert_eq!(r.command, Command::Write);
        assert_eq!(r.payload_len(HeaderMode::Compact), 4);
        assert_eq!(&b[..], b"DATAnext");
    }

    #[test]
    fn extended_request_vector() {
        let wire = hex("21e41c71 0020 0001 00000000000000ff 0000000000001000 0000000000000200");
        assert_eq!(wire.len(), 32);
        let mut b = bm(&wire);
        let r = decode_request(&mut b, HeaderMode::Extended, 1 << 25)
            .unwrap()
            .unwrap();
        assert_eq!(r.command, Command::Write);
        assert!(r.has_flags(NBD_CMD_FLAG_PAYLOAD_LEN));
        assert_eq!(r.payload_len(HeaderMode::Extended), 0x200);
        assert_eq!(&*r.encode(HeaderMode::Extended).unwrap(), &wire[..]);
        // 64-bit effect length without payload.
        let wire = hex("21e41c71 0000 0006 0000000000000001 0000000000000000 0000000200000000");
        let r = decode_request(&mut bm(&wire), HeaderMode::Extended, 0)
            .unwrap()
            .unwrap();
        assert_eq!(r.command, Command::WriteZeroes);
        assert_eq!(r.length, 1 << 33);
        assert_eq!(r.payload_len(HeaderMode::Extended), 0);
    }

    #[test]
    fn option_header_and_reply_header_vectors() {
        let h = OptionHeader {
            opt: Opt::Go,
            len: 0x10,
        }
        .encode();
        assert_eq!(&*h, &hex("49484156454f5054 00000007 00000010")[..]);

        let mut b = BytesMut::new();
        OptionReply::Ack.encode(Opt::Go, &mut b).unwrap();
        assert_eq!(
            &b[..],
            &hex("0003e889045565a9 00000007 00000001 00000000")[..]
        );
        assert_eq!(b.len(), OPTION_REPLY_HEADER_LEN);
    }

    #[test]
    fn info_block_size_is_14_bytes() {
        let mut b = BytesMut::new();
        OptionReply::Info(Info::BlockSize {
            min: 1,
            preferred: 4096,
            max: 32 << 20,
        })
        .encode(Opt::Go, &mut b)
        .unwrap();
        let want =
            hex("0003e889045565a9 00000007 00000003 0000000e  0003 00000001 00001000 02000000");
        assert_eq!(&b[..], &want[..]);
        assert_eq!(b.len() - OPTION_REPLY_HEADER_LEN, 14);
    }

    #[test]
    fn info_export_and_error_vectors() {
        let mut b = BytesMut::new();
        OptionReply::Info(Info::Export {
            size: 1 << 30,
            flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH,
        })
        .encode(Opt::Info, &mut b)
        .unwrap();
        assert_eq!(
            &b[..],
            &hex("0003e889045565a9 00000006 00000003 0000000c 0000 0000000040000000 0005")[..]
        );
        b.clear();
        OptionReply::error(RepError::Unsup, "nope")
            .encode(Opt::Unknown(42), &mut b)
            .unwrap();
        assert_eq!(
            &b[..],
            &hex("0003e889045565a9 0000002a 80000001 00000004 6e6f7065")[..]
        );
        b.clear();
        OptionReply::MetaContext {
            id: 1,
            name: BASE_ALLOCATION.into(),
        }
        .encode(Opt::SetMetaContext, &mut b)
        .unwrap();
        let mut want = hex("0003e889045565a9 0000000a 00000004 00000013 00000001");
        want.extend_from_slice(b"base:allocation");
        assert_eq!(&b[..], &want[..]);
        b.clear();
        OptionReply::Server {
            name: "v".into(),
            description: "d".into(),
        }
        .encode(Opt::List, &mut b)
        .unwrap();
        assert_eq!(
            &b[..],
            &hex("0003e889045565a9 00000003 00000002 00000006 00000001 76 64")[..]
        );
    }

    #[test]
    fn export_name_reply_vector() {
        let mut b = BytesMut::new();
        encode_export_name_reply(&mut b, 0x1000, 0x0003, true);
        assert_eq!(&b[..], &hex("0000000000001000 0003")[..]);
        b.clear();
        encode_export_name_reply(&mut b, 0x1000, 0x0003, false);
        assert_eq!(b.len(), 134);
        assert!(b[10..].iter().all(|&z| z == 0));
        assert_eq!(decode_export_name_reply(&mut b, false), Some((0x1000, 3)));
        assert!(b.is_empty());
    }

    #[test]
    fn simple_and_chunk_header_vectors() {
        let s = simple_reply(0x0102030405060708, Some(Errno::Io));
        assert_eq!(&*s, &hex("67446698 00000005 0102030405060708")[..]);
        let s = simple_reply(7, None);
        assert_eq!(&*s, &hex("67446698 00000000 0000000000000007")[..]);

        let c = ReplyTo {
            mode: HeaderMode::Compact,
            cookie: 9,
            offset: 0x5000,
        };
        let h = c.offset_data(true, 0x6000, 0x1000).unwrap();
        assert_eq!(
            &*h,
            &hex("668e33ef 0001 0001 0000000000000009 00001008 0000000000006000")[..]
        );
        assert_eq!(
            &*c.none(),
            &hex("668e33ef 0001 0000 0000000000000009 00000000")[..]
        );

        let e = ReplyTo {
            mode: HeaderMode::Extended,
            ..c
        };
        let h = e.offset_hole(false, 0x5000, 0x200).unwrap();
        assert_eq!(
            &*h,
            &hex(
                "6e8a278c 0000 0002 0000000000000009 0000000000005000 000000000000000c \
                 0000000000005000 00000200"
            )[..]
        );
        assert_eq!(h.len(), 44);
    }

    #[test]
    fn error_and_block_status_chunk_vectors() {
        let c = ReplyTo {
            mode: HeaderMode::Compact,
            cookie: 1,
            offset: 0,
        };
        let mut b = BytesMut::new();
        c.error(&mut b, true, Errno::Inval, "bad");
        assert_eq!(
            &b[..],
            &hex("668e33ef 0001 8001 0000000000000001 00000009 00000016 0003 626164")[..]
        );
        b.clear();
        let e = ReplyTo {
            mode: HeaderMode::Extended,
            ..c
        };
        e.error_offset(&mut b, false, Errno::Io, "", 0x200);
        assert_eq!(
            &b[..],
            &hex(
                "6e8a278c 0000 8002 0000000000000001 0000000000000000 000000000000000e \
                 00000005 0000 0000000000000200"
            )[..]
        );
        b.clear();
        let ext = [
            Extent {
                length: 0x1000,
                flags: 0,
            },
            Extent {
                length: 0x2000,
                flags: u64::from(NBD_STATE_HOLE | NBD_STATE_ZERO),
            },
        ];
        c.block_status(&mut b, true, 7, &ext).unwrap();
        assert_eq!(
            &b[..],
            &hex("668e33ef 0001 0005 0000000000000001 00000014 00000007 \
                 00001000 00000000 00002000 00000003")[..]
        );
        b.clear();
        e.block_status(&mut b, true, 7, &ext).unwrap();
        assert_eq!(
            &b[..],
            &hex(
                "6e8a278c 0001 0006 0000000000000001 0000000000000000 0000000000000028 \
                 00000007 00000002 \
                 0000000000001000 0000000000000000 0000000000002000 0000000000000003"
            )[..]
        );
    }

    #[test]
    fn go_and_meta_payload_vectors() {
        let lim = OptionLimits::default();
        let go = hex("00000003 766f6c 0002 0003 0001");
        assert_eq!(
            OptionRequest::parse(Opt::Go, &go, &lim),
            Ok(OptionRequest::Go(InfoRequest {
                name: "vol".into(),
                requests: vec![InfoType::BlockSize, InfoType::Name],
            }))
        );
        let mut set = hex("00000001 76 00000001 0000000f");
        set.extend_from_slice(b"base:allocation");
        assert_eq!(
            OptionRequest::parse(Opt::SetMetaContext, &set, &lim),
            Ok(OptionRequest::SetMetaContext(MetaContextRequest {
                name: "v".into(),
                queries: vec![BASE_ALLOCATION.into()],
            }))
        );
    }

    // ---- Handshake behaviour ----

    #[test]
    fn client_flags() {
        let offered = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
        let mut b = bm(&[0, 0, 0]);
        assert_eq!(decode_client_flags(&mut b, offered), Ok(None));
        b.extend_from_slice(&[3]);
        assert_eq!(
            decode_client_flags(&mut b, offered),
            Ok(Some(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            }))
        );
        assert!(b.is_empty());
        // Unknown flag, and NO_ZEROES when the server did not offer it: drop.
        assert!(ClientFlags::from_bits(4 | 1, offered).is_err());
        assert!(ClientFlags::from_bits(2, NBD_FLAG_FIXED_NEWSTYLE).is_err());
        assert!(ClientFlags::from_bits(0, offered).is_ok());
        let f = ClientFlags::from_bits(1, offered).unwrap();
        assert_eq!(&*f.encode(), &[0, 0, 0, 1]);
    }

    #[test]
    fn greeting_bad_magic() {
        let mut b = bm(b"NBDMAGICIHAVEOPX\0\x03");
        assert!(matches!(
            decode_greeting(&mut b),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    fn raw_opt(code: u32, data: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_option_raw(&mut b, code, data).unwrap();
        b.to_vec()
    }

    fn decode_all(dec: &mut OptionDecoder, b: &mut BytesMut) -> Vec<OptionEvent> {
        let mut out = vec![];
        while let Some(ev) = dec.decode(b).unwrap() {
            out.push(ev);
        }
        out
    }

    #[test]
    fn option_decoder_byte_at_a_time() {
        let mut stream = BytesMut::new();
        let reqs = vec![
            OptionRequest::StructuredReply,
            OptionRequest::SetMetaContext(MetaContextRequest {
                name: "x".into(),
                queries: vec![BASE_ALLOCATION.into(), "qemu:dirty-bitmap:a".into()],
            }),
            OptionRequest::Unknown(77),
            OptionRequest::Go(InfoRequest {
                name: "v".into(),
                requests: vec![InfoType::BlockSize],
            }),
        ];
        for r in &reqs {
            r.encode(&mut stream).unwrap();
        }
        let mut dec = OptionDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = vec![];
        for byte in stream {
            buf.put_u8(byte);
            while let Some(ev) = dec.decode(&mut buf).unwrap() {
                got.push(ev);
            }
        }
        let want: Vec<_> = reqs.into_iter().map(OptionEvent::Request).collect();
        assert_eq!(got, want);
        assert!(dec.is_idle());
    }

    #[test]
    fn oversized_option_is_skipped_then_rejected_too_big() {
        let lim = OptionLimits {
            max_payload: 100,
            max_skip: 1000,
            max_queries: 4,
        };
        let mut dec = OptionDecoder::new(lim);
        let mut b = bm(&raw_opt(NBD_OPT_GO, &[0xee; 500]));
        b.extend_from_slice(&raw_opt(NBD_OPT_LIST, &[]));
        // Fed in pieces: the decoder never holds more than a piece.
        let all = b.split();
        let mut evs = vec![];
        for piece in all.chunks(64) {
            b.extend_from_slice(piece);
            evs.extend(decode_all(&mut dec, &mut b));
            assert!(b.len() <= 64 + OPTION_HEADER_LEN);
        }
        assert_eq!(
            evs,
            vec![
                OptionEvent::Rejected {
                    opt: Opt::Go,
                    error: OptionError::TooBig { len: 500, max: 100 }
                },
                OptionEvent::Request(OptionRequest::List),
            ]
        );
        assert_eq!(
            OptionError::TooBig { len: 0, max: 0 }.rep_error(),
            RepError::TooBig
        );
        // Beyond max_skip: drop.
        let mut b = bm(&raw_opt(NBD_OPT_GO, &[0; 1001]));
        assert!(matches!(
            dec.decode(&mut b),
            Err(ProtoError::OptionTooLarge { len: 1001, .. })
        ));
    }

    #[test]
    fn unknown_and_abort_data_is_skipped() {
        let mut dec = OptionDecoder::default();
        let mut b = bm(&raw_opt(NBD_OPT_PEEK_EXPORT, &[1; 300]));
        b.extend_from_slice(&raw_opt(NBD_OPT_ABORT, b"junk"));
        assert_eq!(
            decode_all(&mut dec, &mut b),
            vec![
                OptionEvent::Request(OptionRequest::Unknown(4)),
                OptionEvent::Request(OptionRequest::Abort),
            ]
        );
    }

    #[test]
    fn malformed_options_are_rejected_invalid() {
        let lim = OptionLimits::default();
        let parse = |opt, d: &[u8]| OptionRequest::parse(opt, d, &lim);
        let inval = |r: Result<OptionRequest, OptionError>| {
            let e = r.unwrap_err();
            assert_eq!(e.rep_error(), RepError::Invalid, "{e}");
            assert!(matches!(
                e.reply(),
                OptionReply::Error {
                    error: RepError::Invalid,
                    ..
                }
            ));
            e
        };
        assert_eq!(
            inval(parse(Opt::List, b"x")),
            OptionError::UnexpectedData(1)
        );
        inval(parse(Opt::StartTls, b"x"));
        inval(parse(Opt::StructuredReply, b"x"));
        inval(parse(Opt::ExtendedHeaders, b"x"));
        // Name length past the data, trailing data, count past the data.
        assert_eq!(
            inval(parse(Opt::Go, &hex("00000009 766f6c 0000"))),
            OptionError::Truncated("export name")
        );
        assert_eq!(
            inval(parse(Opt::Info, &hex("00000000 0000 ff"))),
            OptionError::TrailingData(1)
        );
        inval(parse(Opt::Go, &hex("00000000 0002 0000")));
        inval(parse(Opt::Go, &hex("000000")));
        // Strings: > 4096, NUL, invalid UTF-8.
        let mut long = 4097u32.to_be_bytes().to_vec();
        long.extend_from_slice(&[b'a'; 4097]);
        long.extend_from_slice(&[0, 0]);
        assert!(matches!(
            inval(parse(Opt::Go, &long)),
            OptionError::StringTooLong { len: 4097, .. }
        ));
        inval(parse(Opt::ExportName, &[b'a'; 4097]));
        inval(parse(Opt::ExportName, b"a\0b"));
        inval(parse(Opt::ExportName, &[0xff, 0xfe]));
        assert_eq!(
            parse(Opt::ExportName, b""),
            Ok(OptionRequest::ExportName(String::new()))
        );
        // Meta: query past the data, count the data cannot hold.
        inval(parse(
            Opt::ListMetaContext,
            &hex("00000000 00000001 00000005 6162"),
        ));
        inval(parse(
            Opt::ListMetaContext,
            &hex("00000000 00000002 00000000"),
        ));
        inval(parse(Opt::SetMetaContext, &hex("00000000 00000000 00")));
    }

    #[test]
    fn too_many_queries_is_too_big_and_huge_counts_allocate_nothing() {
        let lim = OptionLimits {
            max_queries: 2,
            ..OptionLimits::default()
        };
        let e = OptionRequest::parse(
            Opt::SetMetaContext,
            &hex("00000000 00000003 00000000 00000000 00000000"),
            &lim,
        )
        .unwrap_err();
        assert_eq!(e.rep_error(), RepError::TooBig);
        let lim = OptionLimits {
            max_queries: u32::MAX,
            ..OptionLimits::default()
        };
        assert_eq!(
            OptionRequest::parse(Opt::SetMetaContext, &hex("00000000 ffffffff"), &lim),
            Err(OptionError::Truncated("queries"))
        );
    }

    #[test]
    fn option_bad_magic_is_fatal() {
        let mut dec = OptionDecoder::default();
        let mut b = bm(&hex("4948415645000000 00000007 00000000"));
        assert!(matches!(
            dec.decode(&mut b),
            Err(ProtoError::BadMagic { what: "option", .. })
        ));
    }

    // ---- Transmission behaviour ----

    #[test]
    fn request_incomplete_and_bad_magic() {
        let wire = Request {
            flags: 0,
            command: Command::Flush,
            cookie: 5,
            offset: 0,
            length: 0,
        }
        .encode(HeaderMode::Compact)
        .unwrap();
        let mut b = bm(&wire[..27]);
        assert_eq!(decode_request(&mut b, HeaderMode::Compact, 0), Ok(None));
        assert_eq!(b.len(), 27);
        // A compact header on an extended connection and vice versa.
        let mut b = bm(&wire);
        b.extend_from_slice(&[0; 4]);
        assert!(matches!(
            decode_request(&mut b, HeaderMode::Extended, 0),
            Err(ProtoError::BadMagic { .. })
        ));
        let ext = Request {
            flags: 0,
            command: Command::Flush,
            cookie: 5,
            offset: 0,
            length: 0,
        }
        .encode(HeaderMode::Extended)
        .unwrap();
        assert!(decode_request(&mut bm(&ext), HeaderMode::Compact, 0).is_err());
    }

    #[test]
    fn request_payload_limit() {
        let w = |mode, flags, length| {
            Request {
                flags,
                command: Command::Write,
                cookie: 1,
                offset: 0,
                length,
            }
            .encode(mode)
            .unwrap()
        };
        let max = u64::from(NBD_DEFAULT_MAX_PAYLOAD);
        assert!(
            decode_request(
                &mut bm(&w(HeaderMode::Compact, 0, max)),
                HeaderMode::Compact,
                max
            )
            .unwrap()
            .is_some()
        );
        assert_eq!(
            decode_request(
                &mut bm(&w(HeaderMode::Compact, 0, max + 1)),
                HeaderMode::Compact,
                max
            ),
            Err(ProtoError::PayloadTooLarge {
                cookie: 1,
                len: max + 1,
                max
            })
        );
        let big = w(HeaderMode::Extended, NBD_CMD_FLAG_PAYLOAD_LEN, 1 << 40);
        assert!(decode_request(&mut bm(&big), HeaderMode::Extended, max).is_err());
        // A WRITE's length is a payload length even without the flag (qemu 10 omits it).
        let unflagged = w(HeaderMode::Extended, 0, 1 << 40);
        assert!(decode_request(&mut bm(&unflagged), HeaderMode::Extended, max).is_err());
        // Other commands without PAYLOAD_LEN carry an effect length: no payload, no limit.
        let eff = Request {
            flags: 0,
            command: Command::WriteZeroes,
            cookie: 1,
            offset: 0,
            length: 1 << 40,
        }
        .encode(HeaderMode::Extended)
        .unwrap();
        assert!(
            decode_request(&mut bm(&eff), HeaderMode::Extended, max)
                .unwrap()
                .is_some()
        );
    }

    fn req(command: Command, flags: u16) -> Request {
        Request {
            flags,
            command,
            cookie: 0,
            offset: 0,
            length: 512,
        }
    }

    #[test]
    fn validate_requests() {
        use HeaderMode::{Compact as C, Extended as E};
        let all = NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_SEND_FAST_ZERO
            | NBD_FLAG_SEND_DF
            | NBD_FLAG_SEND_CACHE;
        let ok = |r: Request, m, t| assert_eq!(r.validate(m, t), Ok(()), "{r:?}");
        let err = |r: Request, m, t| r.validate(m, t).unwrap_err();

        ok(req(Command::Read, 0), C, all);
        ok(
            req(Command::Read, NBD_CMD_FLAG_DF | NBD_CMD_FLAG_FUA),
            C,
            all,
        );
        ok(req(Command::Write, NBD_CMD_FLAG_FUA), C, all);
        ok(req(Command::Write, NBD_CMD_FLAG_PAYLOAD_LEN), E, all);
        ok(
            req(
                Command::WriteZeroes,
                NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            ),
            E,
            all,
        );
        ok(req(Command::BlockStatus, NBD_CMD_FLAG_REQ_ONE), C, all);
        ok(req(Command::Cache, 0), C, NBD_FLAG_HAS_FLAGS);
        ok(req(Command::Flush, NBD_CMD_FLAG_FUA), C, all);
        ok(req(Command::Disc, 0xffff), C, 0);

        assert_eq!(
            err(req(Command::Unknown(42), 0), C, all),
            InvalidRequest::UnknownCommand(42)
        );
        assert_eq!(
            err(req(Command::Flush, 0), C, NBD_FLAG_HAS_FLAGS),
            InvalidRequest::NotAdvertised(Command::Flush)
        );
        assert_eq!(
            err(req(Command::Resize, 0), E, all),
            InvalidRequest::NotAdvertised(Command::Resize)
        );
        assert_eq!(
            err(req(Command::Read, NBD_CMD_FLAG_DF), C, NBD_FLAG_HAS_FLAGS),
            InvalidRequest::BadFlags {
                command: Command::Read,
                flags: NBD_CMD_FLAG_DF
            }
        );
        assert_eq!(
            err(req(Command::Write, NBD_CMD_FLAG_FUA), C, NBD_FLAG_HAS_FLAGS).errno(),
            Errno::Inval
        );
        err(req(Command::Read, NBD_CMD_FLAG_NO_HOLE), C, all);
        err(req(Command::Read, 1 << 9), C, all);
        err(
            req(Command::WriteZeroes, NBD_CMD_FLAG_FAST_ZERO),
            C,
            all & !NBD_FLAG_SEND_FAST_ZERO,
        );
        // PAYLOAD_LEN: unknown flag in compact mode; optional on extended WRITE (qemu 10
        // omits it); a payload the command does not take otherwise.
        assert!(matches!(
            err(req(Command::Write, NBD_CMD_FLAG_PAYLOAD_LEN), C, all),
            InvalidRequest::BadFlags { .. }
        ));
        ok(req(Command::Write, 0), E, all);
        assert_eq!(
            err(req(Command::Trim, NBD_CMD_FLAG_PAYLOAD_LEN), E, all),
            InvalidRequest::UnexpectedPayload(Command::Trim)
        );
        err(req(Command::BlockStatus, NBD_CMD_FLAG_PAYLOAD_LEN), E, all);
        ok(
            req(Command::BlockStatus, NBD_CMD_FLAG_PAYLOAD_LEN),
            E,
            all | NBD_FLAG_BLOCK_STATUS_PAYLOAD,
        );
        // Read-only: EPERM.
        let ro = all | NBD_FLAG_READ_ONLY;
        for c in [Command::Write, Command::Trim, Command::WriteZeroes] {
            let e = err(req(c, 0), C, ro);
            assert_eq!(e, InvalidRequest::ReadOnly(c));
            assert_eq!(e.errno(), Errno::Perm);
        }
        ok(req(Command::Read, 0), C, ro);
        ok(req(Command::Flush, 0), C, ro);
        // As a read-only export is advertised: no TRIM or WRITE_ZEROES flag, still EPERM.
        let ro = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_READ_ONLY;
        for c in [Command::Write, Command::Trim, Command::WriteZeroes] {
            assert_eq!(err(req(c, 0), C, ro).errno(), Errno::Perm);
        }
    }

    #[test]
    fn block_status_payload() {
        let p = BlockStatusPayload {
            effect_len: 1 << 40,
            ids: vec![1, 7],
        };
        let b = p.encode();
        assert_eq!(&b[..], &hex("0000010000000000 00000001 00000007")[..]);
        assert_eq!(BlockStatusPayload::parse(&b), Ok(p));
        assert!(BlockStatusPayload::parse(&b[..7]).is_err());
        assert!(BlockStatusPayload::parse(&b[..10]).is_err());
    }

    #[test]
    fn errno_mapping() {
        let cases = [
            (libc::EPERM, Errno::Perm),
            (libc::EACCES, Errno::Perm),
            (libc::EROFS, Errno::Perm),
            (libc::EIO, Errno::Io),
            (libc::ENOMEM, Errno::NoMem),
            (libc::ENOSPC, Errno::NoSpc),
            (libc::EDQUOT, Errno::NoSpc),
            (libc::EFBIG, Errno::NoSpc),
            (libc::EOVERFLOW, Errno::Overflow),
            (libc::ENOTSUP, Errno::NotSup),
            (libc::EOPNOTSUPP, Errno::NotSup),
            (libc::ESHUTDOWN, Errno::Shutdown),
            (libc::EINVAL, Errno::Inval),
            (libc::ENOENT, Errno::Inval),
            (38, Errno::Inval), // ENOSYS: what the `nbd` crate wrongly sends
            (0, Errno::Inval),
            (-5, Errno::Inval),
        ];
        for (e, want) in cases {
            assert_eq!(Errno::from_errno(e), want, "errno {e}");
            assert_eq!(
                Errno::from_io_error(&io::Error::from_raw_os_error(e)),
                want,
                "io {e}"
            );
        }
        let k = |kind| Errno::from_io_error(&io::Error::from(kind));
        assert_eq!(k(io::ErrorKind::PermissionDenied), Errno::Perm);
        assert_eq!(k(io::ErrorKind::StorageFull), Errno::NoSpc);
        assert_eq!(k(io::ErrorKind::UnexpectedEof), Errno::Io);
        assert_eq!(k(io::ErrorKind::Other), Errno::Inval);
        for v in [1, 5, 12, 22, 28, 75, 95, 108] {
            assert_eq!(Errno::from_wire(v).map(Errno::to_u32), Some(v));
        }
        assert_eq!(Errno::from_wire(38), None);
        assert_eq!(Errno::from_wire(0), None);
    }

    #[test]
    fn store_errors_map_through_errno() {
        let e = crate::store::StoreError::NoSpace;
        assert_eq!(Errno::from_errno(e.errno()), Errno::NoSpc);
        let e = crate::store::StoreError::Closed;
        assert_eq!(Errno::from_errno(e.errno()), Errno::Shutdown);
    }

    #[test]
    fn encode_refuses_what_the_wire_cannot_carry() {
        let c = ReplyTo {
            mode: HeaderMode::Compact,
            cookie: 1,
            offset: 0,
        };
        let e = ReplyTo {
            mode: HeaderMode::Extended,
            ..c
        };
        assert!(c.offset_hole(true, 0, 0).is_err());
        assert!(c.offset_data(true, 0, 0).is_err());
        assert!(c.offset_data(true, 0, u32::MAX).is_err());
        assert!(e.offset_data(true, 0, u32::MAX).is_ok());
        let mut b = BytesMut::new();
        assert!(c.block_status(&mut b, true, 1, &[]).is_err());
        let big = Extent {
            length: 1 << 32,
            flags: 0,
        };
        assert!(c.block_status(&mut b, true, 1, &[big]).is_err());
        assert!(e.block_status(&mut b, true, 1, &[big]).is_ok());
        b.clear();
        assert!(
            e.block_status(
                &mut b,
                true,
                1,
                &[Extent {
                    length: 0,
                    flags: 0
                }]
            )
            .is_err()
        );
        assert!(b.is_empty());
        assert!(
            Request {
                flags: 0,
                command: Command::Read,
                cookie: 0,
                offset: 0,
                length: 1 << 32
            }
            .encode(HeaderMode::Compact)
            .is_err()
        );
        assert!(
            OptionRequest::ExportName("a".repeat(4097))
                .encode(&mut b)
                .is_err()
        );
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let msg = "é".repeat(3000); // 6000 bytes
        let c = ReplyTo {
            mode: HeaderMode::Compact,
            cookie: 1,
            offset: 0,
        };
        let mut b = BytesMut::new();
        c.error(&mut b, true, Errno::Io, &msg);
        let Some(Reply::Chunk(ch)) = decode_reply(&mut b, HeaderMode::Compact, 1 << 20).unwrap()
        else {
            panic!()
        };
        let ChunkBody::Error { message, .. } = ch.body().unwrap() else {
            panic!()
        };
        assert_eq!(message.len(), 4096);
        assert_eq!(message, "é".repeat(2048));
    }

    #[test]
    fn reply_decode_errors() {
        // Simple reply magic on an extended connection.
        let s = simple_reply(1, None);
        assert!(decode_reply(&mut bm(&s), HeaderMode::Extended, 1 << 20).is_err());
        // Payload above the limit, and incomplete chunks consume nothing.
        let c = ReplyTo {
            mode: HeaderMode::Compact,
            cookie: 1,
            offset: 0,
        };
        let h = c.offset_data(true, 0, 4096).unwrap();
        assert!(matches!(
            decode_reply(&mut bm(&h), HeaderMode::Compact, 100),
            Err(ProtoError::ReplyTooLarge { .. })
        ));
        let mut b = bm(&h);
        assert_eq!(decode_reply(&mut b, HeaderMode::Compact, 1 << 20), Ok(None));
        assert_eq!(b.len(), h.len());
        // Malformed bodies.
        let chunk = |ty, payload: &[u8]| Chunk {
            flags: 1,
            ty,
            cookie: 0,
            offset: 0,
            payload: Bytes::copy_from_slice(payload),
        };
        assert!(chunk(ReplyType::None, b"x").body().is_err());
        assert!(chunk(ReplyType::OffsetData, &[0; 8]).body().is_err());
        assert!(chunk(ReplyType::OffsetHole, &[0; 12]).body().is_err());
        assert!(chunk(ReplyType::BlockStatus, &[0; 8]).body().is_err());
        assert!(
            chunk(
                ReplyType::BlockStatusExt,
                &hex("00000001 00000002 {}"
                    .replace("{}", &"00".repeat(16))
                    .as_str())
            )
            .body()
            .is_err()
        );
        assert!(
            chunk(ReplyType::Error, &hex("00000005 0005 6162"))
                .body()
                .is_err()
        );
        assert!(
            chunk(ReplyType::Error, &hex("00000005 0000 00"))
                .body()
                .is_err()
        );
        assert_eq!(
            chunk(ReplyType::Unknown(0x8009), &hex("00000005 0001 61 ffff")).body(),
            Ok(ChunkBody::Error {
                error: 5,
                message: "a".into(),
                offset: None
            })
        );
        assert_eq!(
            chunk(ReplyType::Unknown(3), b"").body(),
            Ok(ChunkBody::Unknown)
        );
    }

    #[test]
    fn names_and_display() {
        assert_eq!(Opt::Go.to_string(), "NBD_OPT_GO");
        assert_eq!(Opt::from_raw(4).to_string(), "unknown Opt 0x4");
        assert_eq!(
            RepError::from_raw(NBD_REP_ERR_UNKNOWN),
            RepError::UnknownExport
        );
        assert_eq!(Command::from_raw(7), Command::BlockStatus);
        assert_eq!(ReplyType::ErrorOffset.to_raw(), 0x8002);
        assert!(ReplyType::Unknown(0x8005).is_error());
        assert_eq!(Errno::NoSpc.to_string(), "NBD_ENOSPC");
        assert_eq!(
            split_meta_context(BASE_ALLOCATION),
            Some(("base", "allocation"))
        );
        assert_eq!(split_meta_context("base:"), Some(("base", "")));
        assert_eq!(split_meta_context(":x"), None);
        assert_eq!(split_meta_context("nocolon"), None);
    }

    // ---- Property tests: round trips ----

    fn arb_string() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:_./é-]{0,40}"
    }

    fn arb_unknown_opt() -> impl Strategy<Value = u32> {
        any::<u32>().prop_filter("unknown", |c| matches!(Opt::from_raw(*c), Opt::Unknown(_)))
    }

    fn arb_info_request() -> impl Strategy<Value = InfoRequest> {
        (
            arb_string(),
            proptest::collection::vec(any::<u16>().prop_map(InfoType::from_raw), 0..6),
        )
            .prop_map(|(name, requests)| InfoRequest { name, requests })
    }

    fn arb_meta_request() -> impl Strategy<Value = MetaContextRequest> {
        (arb_string(), proptest::collection::vec(arb_string(), 0..6))
            .prop_map(|(name, queries)| MetaContextRequest { name, queries })
    }

    fn arb_option_request() -> impl Strategy<Value = OptionRequest> {
        prop_oneof![
            arb_string().prop_map(OptionRequest::ExportName),
            Just(OptionRequest::Abort),
            Just(OptionRequest::List),
            Just(OptionRequest::StartTls),
            arb_info_request().prop_map(OptionRequest::Info),
            arb_info_request().prop_map(OptionRequest::Go),
            Just(OptionRequest::StructuredReply),
            arb_meta_request().prop_map(OptionRequest::ListMetaContext),
            arb_meta_request().prop_map(OptionRequest::SetMetaContext),
            Just(OptionRequest::ExtendedHeaders),
            arb_unknown_opt().prop_map(OptionRequest::Unknown),
        ]
    }

    fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..max)
    }

    fn arb_option_reply() -> impl Strategy<Value = OptionReply> {
        let info = prop_oneof![
            (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| Info::Export { size, flags }),
            arb_string().prop_map(Info::Name),
            arb_string().prop_map(Info::Description),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(min, preferred, max)| {
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                }
            }),
            (4u16.., arb_bytes(20)).prop_map(|(ty, d)| Info::Unknown { ty, data: d.into() }),
        ];
        prop_oneof![
            Just(OptionReply::Ack),
            (arb_string(), arb_string())
                .prop_map(|(name, description)| OptionReply::Server { name, description }),
            info.prop_map(OptionReply::Info),
            (any::<u32>(), arb_string())
                .prop_map(|(id, name)| OptionReply::MetaContext { id, name }),
            (any::<u32>(), arb_string()).prop_map(|(e, message)| OptionReply::Error {
                error: RepError::from_raw(e | NBD_REP_FLAG_ERROR),
                message
            }),
            (5u32..NBD_REP_FLAG_ERROR, arb_bytes(20))
                .prop_map(|(ty, d)| OptionReply::Unknown { ty, data: d.into() }),
        ]
    }

    fn arb_mode() -> impl Strategy<Value = HeaderMode> {
        prop_oneof![Just(HeaderMode::Compact), Just(HeaderMode::Extended)]
    }

    /// Feeds `stream` to `step` in pieces of the given sizes (cycled), like socket reads.
    fn split_points() -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(1usize..64, 1..8)
    }

    fn arb_errno() -> impl Strategy<Value = Errno> {
        prop_oneof![
            Just(Errno::Perm),
            Just(Errno::Io),
            Just(Errno::NoMem),
            Just(Errno::Inval),
            Just(Errno::NoSpc),
            Just(Errno::Overflow),
            Just(Errno::NotSup),
            Just(Errno::Shutdown),
        ]
    }

    #[derive(Debug, Clone)]
    enum ChunkSpec {
        None,
        Data(u64, Vec<u8>),
        Hole(u64, u32),
        Status(u32, Vec<(u32, u32)>),
        Error(Errno, String, Option<u64>),
    }

    fn arb_chunk() -> impl Strategy<Value = ChunkSpec> {
        prop_oneof![
            Just(ChunkSpec::None),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..64))
                .prop_map(|(o, d)| ChunkSpec::Data(o, d)),
            (any::<u64>(), 1u32..).prop_map(|(o, l)| ChunkSpec::Hole(o, l)),
            (
                any::<u32>(),
                proptest::collection::vec((1u32.., any::<u32>()), 1..10)
            )
                .prop_map(|(id, e)| ChunkSpec::Status(id, e)),
            (
                arb_errno(),
                arb_string(),
                proptest::option::of(any::<u64>())
            )
                .prop_map(|(e, m, o)| ChunkSpec::Error(e, m, o)),
        ]
    }

    proptest! {
        #[test]
        fn options_round_trip(reqs in proptest::collection::vec(arb_option_request(), 1..6),
                              splits in split_points()) {
            let mut stream = BytesMut::new();
            for r in &reqs {
                r.encode(&mut stream).unwrap();
            }
            let mut dec = OptionDecoder::default();
            let mut buf = BytesMut::new();
            let mut got = vec![];
            let mut rest = &stream[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = splits[i % splits.len()].min(rest.len());
                i += 1;
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                while let Some(ev) = dec.decode(&mut buf).unwrap() {
                    got.push(ev);
                }
            }
            let want: Vec<_> = reqs.into_iter().map(OptionEvent::Request).collect();
            prop_assert_eq!(got, want);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn option_replies_round_trip(reply in arb_option_reply(), opt in any::<u32>()) {
            let opt = Opt::from_raw(opt);
            let mut b = BytesMut::new();
            reply.encode(opt, &mut b).unwrap();
            let full = b.clone();
            // Every proper prefix is incomplete and consumes nothing.
            for cut in [0, 1, OPTION_REPLY_HEADER_LEN, full.len().saturating_sub(1)] {
                if cut < full.len() {
                    let mut p = BytesMut::from(&full[..cut]);
                    prop_assert_eq!(OptionReply::decode(&mut p, 1 << 16).unwrap(), None);
                    prop_assert_eq!(p.len(), cut);
                }
            }
            let got = OptionReply::decode(&mut b, 1 << 16).unwrap();
            prop_assert_eq!(got, Some((opt, reply)));
            prop_assert!(b.is_empty());
        }

        #[test]
        fn requests_round_trip(mode in arb_mode(), flags in any::<u16>(), cmd in any::<u16>(),
                               cookie in any::<u64>(), offset in any::<u64>(),
                               length in any::<u64>()) {
            let length = match mode {
                HeaderMode::Compact => length & 0xffff_ffff,
                HeaderMode::Extended => length,
            };
            let r = Request { flags, command: Command::from_raw(cmd), cookie, offset, length };
            let h = r.encode(mode).unwrap();
            prop_assert_eq!(h.len(), mode.request_len());
            let mut b = BytesMut::from(&h[..]);
            b.extend_from_slice(b"tail");
            let got = decode_request(&mut b, mode, u64::MAX).unwrap();
            prop_assert_eq!(got, Some(r));
            prop_assert_eq!(&b[..], b"tail");
            // The payload limit is exactly payload_len.
            let p = r.payload_len(mode);
            prop_assert!(decode_request(&mut BytesMut::from(&h[..]), mode, p).unwrap().is_some());
            if p > 0 {
                let res = decode_request(&mut BytesMut::from(&h[..]), mode, p - 1);
                prop_assert!(res.is_err());
            }
        }

        #[test]
        fn simple_replies_round_trip(cookie in any::<u64>(),
                                     err in proptest::option::of(arb_errno())) {
            let h = simple_reply(cookie, err);
            let mut b = BytesMut::from(&h[..]);
            let got = decode_reply(&mut b, HeaderMode::Compact, 0).unwrap();
            prop_assert_eq!(got, Some(Reply::Simple {
                cookie,
                error: err.map_or(0, Errno::to_u32)
            }));
        }

        #[test]
        fn chunks_round_trip(mode in arb_mode(), cookie in any::<u64>(), offset in any::<u64>(),
                             done in any::<bool>(), spec in arb_chunk()) {
            let to = ReplyTo { mode, cookie, offset };
            let mut b = BytesMut::new();
            let want = match &spec {
                ChunkSpec::None => {
                    b.put_slice(&to.none());
                    ChunkBody::None
                }
                ChunkSpec::Data(o, d) => {
                    // Header and data as separate slices, as a vectored write sends them.
                    b.put_slice(&to.offset_data(done, *o, d.len() as u32).unwrap());
                    b.put_slice(d);
                    ChunkBody::OffsetData { offset: *o, data: Bytes::copy_from_slice(d) }
                }
                ChunkSpec::Hole(o, l) => {
                    b.put_slice(&to.offset_hole(done, *o, *l).unwrap());
                    ChunkBody::OffsetHole { offset: *o, length: *l }
                }
                ChunkSpec::Status(id, ext) => {
                    let ext: Vec<_> = ext
                        .iter()
                        .map(|&(l, f)| Extent { length: l.into(), flags: f.into() })
                        .collect();
                    to.block_status(&mut b, done, *id, &ext).unwrap();
                    ChunkBody::BlockStatus { context_id: *id, extents: ext }
                }
                ChunkSpec::Error(e, m, o) => {
                    match o {
                        Some(o) => to.error_offset(&mut b, done, *e, m, *o),
                        None => to.error(&mut b, done, *e, m),
                    }
                    ChunkBody::Error { error: e.to_u32(), message: m.clone(), offset: *o }
                }
            };
            let total = b.len();
            let mut partial = BytesMut::from(&b[..total - 1]);
            prop_assert_eq!(decode_reply(&mut partial, mode, 1 << 20).unwrap(), None);
            prop_assert_eq!(partial.len(), total - 1);
            let Some(Reply::Chunk(ch)) = decode_reply(&mut b, mode, 1 << 20).unwrap() else {
                return Err(TestCaseError::fail("not a chunk"));
            };
            prop_assert!(b.is_empty());
            prop_assert_eq!(ch.cookie, cookie);
            prop_assert_eq!(ch.offset, if mode == HeaderMode::Extended { offset } else { 0 });
            let done_expected = done || matches!(spec, ChunkSpec::None);
            prop_assert_eq!(ch.is_done(), done_expected);
            let ty_ok = match (&spec, mode) {
                (ChunkSpec::Status(..), HeaderMode::Compact) => ch.ty == ReplyType::BlockStatus,
                (ChunkSpec::Status(..), HeaderMode::Extended) => ch.ty == ReplyType::BlockStatusExt,
                _ => true,
            };
            prop_assert!(ty_ok);
            prop_assert_eq!(ch.body().unwrap(), want);
        }

        #[test]
        fn client_flags_round_trip(fixed in any::<bool>(), nz in any::<bool>()) {
            let f = ClientFlags { fixed_newstyle: fixed, no_zeroes: nz };
            let mut b = BytesMut::from(&f.encode()[..]);
            let got = decode_client_flags(&mut b, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
            prop_assert_eq!(got.unwrap(), Some(f));
        }

        #[test]
        fn export_name_reply_round_trip(size in any::<u64>(), fl in any::<u16>(),
                                        nz in any::<bool>()) {
            let mut b = BytesMut::new();
            encode_export_name_reply(&mut b, size, fl, nz);
            prop_assert_eq!(decode_export_name_reply(&mut b, nz), Some((size, fl)));
            prop_assert!(b.is_empty());
        }

        #[test]
        fn block_status_payload_round_trip(len in any::<u64>(),
                                           ids in proptest::collection::vec(any::<u32>(), 0..8)) {
            let p = BlockStatusPayload { effect_len: len, ids };
            prop_assert_eq!(BlockStatusPayload::parse(&p.encode()), Ok(p));
        }
    }

    // ---- Property tests: hostile input never panics, stays bounded ----

    /// Arbitrary bytes, with valid magics sprinkled in so decoders get past the first check.
    fn hostile_stream() -> impl Strategy<Value = Vec<u8>> {
        let seg = prop_oneof![
            arb_bytes(48),
            Just(IHAVEOPT.to_be_bytes().to_vec()),
            Just(NBD_OPT_REPLY_MAGIC.to_be_bytes().to_vec()),
            Just(NBD_REQUEST_MAGIC.to_be_bytes().to_vec()),
            Just(NBD_EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec()),
            Just(NBD_SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec()),
            Just(NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec()),
            Just(NBD_EXTENDED_REPLY_MAGIC.to_be_bytes().to_vec()),
            // A plausible option header with a small length.
            (0u32..16, 0u32..80).prop_map(|(o, l)| {
                let mut v = IHAVEOPT.to_be_bytes().to_vec();
                v.extend_from_slice(&o.to_be_bytes());
                v.extend_from_slice(&l.to_be_bytes());
                v
            }),
        ];
        proptest::collection::vec(seg, 0..12).prop_map(|v| v.concat())
    }

    /// Runs `step` over `stream` delivered in pieces; `step` returns false to stop (fatal).
    fn feed(stream: &[u8], splits: &[usize], mut step: impl FnMut(&mut BytesMut) -> bool) {
        let mut buf = BytesMut::new();
        let mut rest = stream;
        let mut i = 0;
        while !rest.is_empty() {
            let n = splits[i % splits.len()].min(rest.len());
            i += 1;
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if !step(&mut buf) {
                return;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn option_decoder_survives_anything(stream in hostile_stream(), splits in split_points(),
                                            max_payload in 0u32..64, max_q in 0u32..4) {
            let lim = OptionLimits { max_payload, max_skip: 128, max_queries: max_q };
            let mut dec = OptionDecoder::new(lim);
            feed(&stream, &splits, |buf| loop {
                let before = buf.len();
                match dec.decode(buf) {
                    Err(_) => return false,
                    Ok(None) => return true,
                    Ok(Some(ev)) => {
                        assert!(buf.len() < before);
                        if let OptionEvent::Request(
                            OptionRequest::SetMetaContext(m) | OptionRequest::ListMetaContext(m),
                        ) = &ev
                        {
                            assert!(m.queries.len() <= max_q as usize);
                        }
                    }
                }
            });
        }

        #[test]
        fn option_payload_parse_survives_anything(opt in 0u32..16, data in arb_bytes(256)) {
            let _ = OptionRequest::parse(Opt::from_raw(opt), &data, &OptionLimits::default());
        }

        #[test]
        fn request_decoder_survives_anything(mode in arb_mode(), stream in hostile_stream(),
                                             splits in split_points(),
                                             tflags in any::<u16>()) {
            let mut pending = 0usize;
            feed(&stream, &splits, |buf| loop {
                if pending > 0 {
                    let n = pending.min(buf.len());
                    buf.advance(n);
                    pending -= n;
                    if pending > 0 {
                        return true;
                    }
                }
                match decode_request(buf, mode, 64) {
                    Err(_) => return false,
                    Ok(None) => return true,
                    Ok(Some(r)) => {
                        let _ = r.validate(mode, tflags);
                        pending = r.payload_len(mode) as usize;
                        assert!(pending <= 64);
                    }
                }
            });
        }

        #[test]
        fn reply_decoder_survives_anything(mode in arb_mode(), stream in hostile_stream(),
                                           splits in split_points()) {
            feed(&stream, &splits, |buf| loop {
                match decode_reply(buf, mode, 64) {
                    Err(_) => return false,
                    Ok(None) => return true,
                    Ok(Some(Reply::Chunk(c))) => {
                        assert!(c.payload.len() <= 64);
                        let _ = c.body();
                    }
                    Ok(Some(Reply::Simple { .. })) => {}
                }
            });
        }

        #[test]
        fn option_reply_decoder_survives_anything(stream in hostile_stream(),
                                                  splits in split_points()) {
            feed(&stream, &splits, |buf| loop {
                match OptionReply::decode(buf, 64) {
                    Err(_) => return false,
                    Ok(None) => return true,
                    Ok(Some(_)) => {}
                }
            });
        }

        #[test]
        fn small_decoders_survive_anything(data in arb_bytes(200), nz in any::<bool>(),
                                           offered in any::<u16>()) {
            let _ = decode_greeting(&mut BytesMut::from(&data[..]));
            let _ = decode_client_flags(&mut BytesMut::from(&data[..]), offered);
            let _ = decode_export_name_reply(&mut BytesMut::from(&data[..]), nz);
            let _ = BlockStatusPayload::parse(&data);
            for ty in [0u16, 1, 2, 5, 6, 0x8001, 0x8002, 0x8003, 9] {
                let c = Chunk {
                    flags: 0,
                    ty: ReplyType::from_raw(ty),
                    cookie: 0,
                    offset: 0,
                    payload: Bytes::copy_from_slice(&data),
                };
                let _ = c.body();
            }
        }
    }
}
